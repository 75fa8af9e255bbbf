"""Reading rows: local files and directories, https downloads, hub ids.

The file formats themselves are read by `shared.dataset_files`, which the API also uses to
validate uploads; this module turns its errors into `PipelineError` and adds what only the
worker does: downloads and the hub. Parse errors name the file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from shared import dataset_files
from shared.dataset_files import FORMATS, DatasetFileError, LoadedDataset
from shared.sources import redact_url, url_file_name
from shared.url_guard import UrlPolicy, UrlRefused, check_url
from worker.pipeline.errors import PipelineError
from worker.pipeline.pinned_http import pinned_client
from worker.pipeline.report import LogFn, no_log

__all__ = [
    "FORMATS",
    "LoadedDataset",
    "download_url",
    "load_hub_dataset",
    "read_file",
    "read_local",
]

Row = Mapping[str, Any]

MAX_DOWNLOAD_BYTES = 20 * 1024**3
MAX_REDIRECTS = 5


def read_local(path: Path, allowed_dirs: Iterable[Path], *, shown: str | None = None
               ) -> LoadedDataset:
    """A local file, or every data file of a directory in name order; only files that, as
    opened, lie inside `allowed_dirs` (see `shared.local_files`). Errors call the file
    `shown` (the user's data_path), never a link's target."""
    try:
        return dataset_files.read_local(path, allowed_dirs, shown=shown)
    except DatasetFileError as exc:
        raise PipelineError(str(exc)) from None


def read_file(path: Path, fmt: str | None = None, *, max_rows: int | None = None) -> LoadedDataset:
    """Parse one json/jsonl/csv/parquet file; the format comes from the suffix unless given.
    Reading stops with `PipelineError` past `max_rows` rows."""
    try:
        return dataset_files.read_file(path, fmt, max_rows=max_rows)
    except DatasetFileError as exc:
        raise PipelineError(str(exc)) from None


def download_url(
    url: str,
    dest_dir: Path,
    *,
    policy: UrlPolicy | None = None,
    client: httpx.Client | None = None,
    log: LogFn = no_log,
) -> Path:
    """Download a URL that `policy` allows into `dest_dir` and return the file, its suffix the
    format.

    Every hop (the URL and up to `MAX_REDIRECTS` redirects) passes `policy`'s scheme and host
    checks, and the default client connects only to addresses that passed them. A `client`
    given instead (tests) must guard its connections itself. The format comes from the URL's
    file name, else the Content-Type, else the first bytes. Log lines and errors never show
    the query string (a presigned URL's signature).
    """
    policy = policy or UrlPolicy()
    shown = redact_url(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest_dir / "download.part"
    own_client = client is None
    client = client or pinned_client(policy)
    try:
        with _get_following_redirects(client, url, policy) as response:
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
        raise PipelineError(f"downloading {shown} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if own_client:
            client.close()
    fmt = dataset_files.detect_format(partial, url_file_name(url), content_type)
    path = dest_dir / f"dataset.{fmt}"
    partial.replace(path)
    log(f"downloaded {shown}: {size} bytes, read as {fmt}")
    return path


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
            raise PipelineError(_refused_hop_message(url, hop_url, hop, exc)) from None
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


def _refused_hop_message(url: str, hop_url: str, hop: int, exc: UrlRefused) -> str:
    if hop == 0:
        return f"downloading {redact_url(url)} refused: {exc}"
    return (
        f"downloading {redact_url(url)}: redirect {hop} to {redact_url(hop_url)} refused: {exc}"
    )


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
