"""Where a job's rows come from: `data_path` resolved and fetched into a `LoadedDataset`.

A local file or directory, an https URL, an uploaded dataset id (`ds_…`, read from storage),
or a hub dataset id. `shared.sources` classifies the value (the API does the same at submit
time), `shared.url_guard` checks every URL hop, and `shared.dataset_files` parses the files,
as it does for the API's upload check, so the worker reads exactly what the API accepted.
Errors are `PipelineError`, naming the file and line; URLs are shown without their query.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared import dataset_files
from shared.csv_files import COMMA, describe_delimiter
from shared.dataset_files import DatasetFileError, LoadedDataset
from shared.pinned_http import pinned_client
from shared.sources import Source, SourceError, check_source_type, classify_source
from shared.storage import ObjectNotFound, Storage, StorageError, StorageUnreachable
from shared.storage_keys import dataset_prefix
from shared.url_guard import UrlPolicy, UrlRefused, check_url, redact_url
from worker.pipeline.errors import PipelineError
from worker.pipeline.report import LogFn, no_log

# No http URLs, no private hosts: what `UrlPolicy()` allows when nobody passes a policy.
STRICT_URLS = UrlPolicy()

MAX_DOWNLOAD_BYTES = 20 * 1024**3
MAX_REDIRECTS = 5


def load_dataset(
    data_path: str,
    *,
    allowed_local_dirs: Iterable[Path],
    download_dir: Path,
    subset: str | None = None,
    source_type: str = "hub_link",
    token: str | None = None,
    client: httpx.Client | None = None,
    url_policy: UrlPolicy = STRICT_URLS,
    storage: Storage | None = None,
    max_rows: int | None = None,
    hub_cache_dir: Path | None = None,
    log: LogFn = no_log,
) -> LoadedDataset:
    """Load the rows `data_path` names: a local file/dir, an https URL, an uploaded dataset id
    (`ds_…`, read from `storage`), or a hub dataset id.

    URLs follow `url_policy` (default: no exceptions to the rules; `run_job` passes the
    operator's) at every redirect hop, and the download connects only to addresses it
    allows. Raises `PipelineError` for refused paths,
    unreadable or unparseable data (naming the line or row), hub datasets that cannot be
    loaded, and more than `max_rows` rows. `hub_cache_dir` is where hub downloads go
    (default: the shared Hugging Face cache; see `worker.pipeline.job_dirs`).
    """
    allowed_local_dirs = list(allowed_local_dirs)
    source = _classified(data_path, source_type, allowed_local_dirs, url_policy)
    if source.kind == "hub":
        dataset = load_hub_dataset(data_path, subset, token=token, cache_dir=hub_cache_dir)
    else:
        file = _data_file(data_path, source, download_dir, storage=storage,
                          url_policy=url_policy, client=client, log=log)
        try:
            if file.local:
                dataset = dataset_files.read_local(file.path, allowed_local_dirs,
                                                   shown=file.origin)
            else:
                # Downloaded into the job's dir, where it stays while the job runs: rows are
                # read from it as they are used, never all held.
                dataset = dataset_files.read_file(file.path, max_rows=max_rows, stream=True)
                dataset.origin = file.origin
        except DatasetFileError as exc:
            raise PipelineError(str(exc)) from None
        _log_csv_delimiters(dataset, directory=file.local and file.path.is_dir(), log=log)
    if not dataset.rows:
        raise PipelineError(f"the dataset {dataset.origin} has no rows")
    # Files stop reading past `max_rows`; hub datasets and local directories are counted here.
    if max_rows is not None and len(dataset.rows) > max_rows:
        raise PipelineError(
            f"the dataset {dataset.origin} has {len(dataset.rows)} rows, more than the "
            f"{max_rows} this server accepts (TUNERY_MAX_DATASET_ROWS)"
        )
    log(f"dataset {dataset.origin}: {len(dataset.rows)} rows, columns {dataset.columns}")
    return dataset


def _log_csv_delimiters(dataset: LoadedDataset, *, directory: bool, log: LogFn) -> None:
    """Say which CSV files were read with another delimiter than a comma: a user who meant
    commas learns why the columns are what they are."""
    for file_name, delimiter in dataset.csv_delimiters.items():
        if delimiter != COMMA:
            shown = f"{dataset.origin}/{file_name}" if directory else dataset.origin
            log(f"dataset {shown}: CSV read with {describe_delimiter(delimiter)} between "
                "fields, the delimiter its header line uses")


def _classified(
    data_path: str, source_type: str, allowed_local_dirs: list[Path], url_policy: UrlPolicy
) -> Source:
    """`data_path` classified with this worker's settings, which decide what it may read."""
    try:
        source = classify_source(data_path, allowed_local_dirs, url_policy=url_policy)
        check_source_type(source, source_type)
    except SourceError as exc:
        raise PipelineError(f"data_path: {exc}") from None
    return source


@dataclass(frozen=True)
class DataFile:
    """A dataset file on this worker and how messages call it. A `local` one is read in place
    (every read checked against allowed_local_dirs) and may be a directory of files; the
    others were fetched into the job's download directory."""

    path: Path
    origin: str
    local: bool = False


def _data_file(
    data_path: str, source: Source, download_dir: Path, *, storage: Storage | None,
    url_policy: UrlPolicy, client: httpx.Client | None, log: LogFn,
) -> DataFile:
    """The file `data_path` names: an uploaded dataset's or a URL's fetched into
    `download_dir`, a local one (resolved by the classification) where it lies."""
    if source.kind == "dataset":
        return _download_uploaded(data_path, storage, download_dir, log)
    if source.kind == "url":
        return download_url(data_path, download_dir, policy=url_policy, client=client, log=log)
    assert source.path is not None
    return DataFile(source.path, data_path, local=True)


def download_url(
    url: str,
    dest_dir: Path,
    *,
    policy: UrlPolicy | None = None,
    client: httpx.Client | None = None,
    log: LogFn = no_log,
) -> DataFile:
    """Download a URL that `policy` allows into `dest_dir` and return the file, its suffix the
    format, called by the URL without its query.

    Every hop (the URL and up to `MAX_REDIRECTS` redirects) passes `policy`'s scheme and host
    checks, and the default client connects only to addresses that passed them. A `client`
    given instead (tests) must guard its connections itself. The format comes from the URL's
    file name, else the Content-Type, else the first bytes. Log lines and errors never show
    the query string (a presigned URL's signature).
    """
    policy = policy or UrlPolicy()
    file_name = _url_file_name(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest_dir / "download.part"
    own_client = client is None
    client = client or pinned_client(policy)
    try:
        with _get_following_redirects(client, url, policy) as response:
            shown = redact_url(url)
            if response.status_code != 200:
                hint = " (a presigned link may have expired)" if response.status_code == 403 else ""
                raise PipelineError(
                    f"downloading {shown} failed: HTTP {response.status_code}{hint}"
                )
            size = 0
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise PipelineError(
                            f"{shown} is larger than {MAX_DOWNLOAD_BYTES // 1024**3} GiB"
                        )
                    out.write(chunk)
            content_type = response.headers.get("content-type", "")
    except httpx.HTTPError as exc:
        raise PipelineError(
            f"downloading {redact_url(url)} failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        if own_client:
            client.close()
    fmt = dataset_files.detect_format(partial, file_name, content_type)
    path = dest_dir / f"dataset.{fmt}"
    partial.replace(path)
    log(f"downloaded {shown}: {size} bytes, read as {fmt}")
    return DataFile(path, shown)


@contextmanager
def _get_following_redirects(
    client: httpx.Client, url: str, policy: UrlPolicy
) -> Iterator[httpx.Response]:
    """GET `url`, following redirects by hand so that each hop is checked before it is
    fetched; yields the first response that is not a redirect."""
    hop_url = url
    for hop in range(MAX_REDIRECTS + 1):
        try:
            check_url(hop_url, policy)
            response = client.send(client.build_request("GET", hop_url), stream=True,
                                   follow_redirects=False)
        except UrlRefused as exc:
            where = " refused" if hop == 0 else f": redirect {hop} to {redact_url(hop_url)} refused"
            raise PipelineError(f"downloading {redact_url(url)}{where}: {exc}") from None
        if not response.is_redirect:
            try:
                yield response
            finally:
                response.close()
            return
        response.close()
        try:
            hop_url = str(response.url.join(response.headers["location"]))
        except httpx.InvalidURL as exc:
            raise PipelineError(
                f"downloading {redact_url(url)}: redirect {hop + 1} has a malformed "
                f"Location: {exc}"
            ) from None
    raise PipelineError(
        f"downloading {redact_url(url)}: more than {MAX_REDIRECTS} redirects; giving up"
    )


def _url_file_name(url: str) -> str:
    """The last path segment of a URL (query ignored), e.g. `train.jsonl`; may be empty."""
    return PurePosixPath(urlsplit(url).path).name


def _download_uploaded(
    dataset_id: str, storage: Storage | None, download_dir: Path, log: LogFn
) -> DataFile:
    """Copy an uploaded dataset's file (its name carries the format) into `download_dir`.

    The API checked at submit that the dataset belongs to the job's tenant and parsed; only
    validated files live under its `dataset_prefix`.
    """
    if storage is None:
        raise PipelineError(f"data_path {dataset_id!r} is an uploaded dataset: no storage given")
    try:
        objects = storage.list(dataset_prefix(dataset_id))
        if not objects:
            raise ObjectNotFound(dataset_id)
        key = objects[0].key
        dest = download_dir / key.rsplit("/", 1)[-1]
        storage.download_file(key, dest)
    except ObjectNotFound:
        raise PipelineError(
            f"uploaded dataset {dataset_id} has no file in storage; upload it again"
        ) from None
    except StorageUnreachable:
        raise  # no fault of the job: the attempt hands it back (`worker.attempt`)
    except StorageError as exc:
        raise PipelineError(f"cannot read uploaded dataset {dataset_id}: {exc}") from None
    log(f"downloaded uploaded dataset {dataset_id}: {objects[0].size} bytes, {dest.name}")
    return DataFile(dest, dataset_id)


def load_hub_dataset(
    dataset_id: str, subset: str | None, *, token: str | None, cache_dir: Path | None = None
) -> LoadedDataset:
    """`datasets.load_dataset(dataset_id, subset)`, its "train" split (or its only one).

    `dataset_id` must be `owner/name`: a bare name is a packaged builder ("text", "csv", …)
    that collects data files under the current directory. `cache_dir` None is the shared
    Hugging Face cache; a job with a token passes its tenant's own."""
    if "/" not in dataset_id:
        raise PipelineError(
            f"hub dataset id {dataset_id!r} must be 'owner/name'; a bare name is not a hub dataset"
        )
    # datasets.load_dataset reads a local directory of the same name first; a hub id must
    # never become a way around allowed_local_dirs.
    if Path(dataset_id).exists():
        raise PipelineError(
            f"hub dataset id {dataset_id!r} is also a path on the worker; refusing the ambiguity"
        )
    import datasets

    label = dataset_id + (f" (subset {subset})" if subset else "")
    options: dict[str, Any] = {"token": token}
    if cache_dir is not None:
        options["cache_dir"] = str(cache_dir)
    try:
        loaded = datasets.load_dataset(dataset_id, subset, **options)
    except Exception as exc:  # any failure here means "this dataset cannot be read"
        raise PipelineError(
            f"could not load hub dataset {label}: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        name = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[name]
    return LoadedDataset(list(loaded.column_names), loaded, label)
