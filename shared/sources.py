"""What kind of source a `data_path` or `model_path` is: a local path, an https URL, an
uploaded dataset id, or a hub id. Classification only: the worker fetches and reads
(`worker.pipeline.data_source`, `worker.pipeline.model`).

The API calls `classify_source` at submit time so a refused value is a 422 before anything is
queued; the worker calls it again before reading, because the worker's settings decide what it
may read. Pure standard library: the API image has no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from shared.url_guard import UrlPolicy, UrlRefused, check_url, check_url_resolves, redact_url

SourceKind = Literal["local", "url", "dataset", "hub"]
HTTPS_ONLY = UrlPolicy()

# Ids of datasets uploaded to Tunery (`POST /v1/datasets`, `GET /v1/upload`): "ds_" and a
# uuid4 in hex. Checked before hub ids, which this grammar would also match.
DATASET_ID_PREFIX = "ds_"
DATASET_ID = re.compile(rf"{DATASET_ID_PREFIX}[0-9a-f]{{32}}")
UPLOAD_HINT = ("upload it with POST /v1/datasets (or GET /v1/upload) and pass the 'ds_…' id it "
               "returns as data_path")

# Hub ids are `name` or `owner/name`, as the Hugging Face Hub spells them: each part 1 to 96
# characters, starting with a letter or digit and ending with a letter, digit or `_`, with no
# `--` or `..` (checked apart). ASCII only: `\w` would otherwise accept any Unicode letter,
# and look-alike characters have no business in an id.
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}\w)?"
_HUB_ID = re.compile(rf"{_HUB_PART}(/{_HUB_PART})?", re.ASCII)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


class SourceError(ValueError):
    """A data_path or model_path that Tunery refuses to read; the message says why."""


@dataclass(frozen=True)
class Source:
    """A classified source. `path` is set (resolved, inside an allowed dir) for local ones."""

    kind: SourceKind
    value: str
    path: Path | None = None


def classify_source(
    value: str,
    allowed_local_dirs: Iterable[Path],
    *,
    allow_urls: bool = True,
    url_policy: UrlPolicy = HTTPS_ONLY,
    bare_hub_names: bool = False,
) -> Source:
    """Classify `value` as a local path, an https URL, an uploaded dataset id or a hub id, or
    raise `SourceError`.

    - Absolute paths are local and must resolve (symlinks and `..` followed) to a path inside
      one of `allowed_local_dirs`; with none configured every local path is refused. Relative
      paths are refused: they would depend on the worker's current directory.
    - `https://` URLs are URLs (pass `allow_urls=False` where only models are meant); plain
      `http:` only where `url_policy` allows it; any other scheme, `file:` included, is
      refused. The host must pass `shared.url_guard.check_url` (grammar and IP literals, no
      DNS); `check_url_source_resolves` adds the resolution.
    - `ds_` + 32 hex digits is an uploaded dataset (its tenant is checked by the API); any
      other data value starting with `ds_` is an uploaded dataset that cannot exist.
    - Everything else must be a hub id: `owner/name`, or also a bare `name` with
      `bare_hub_names` (models: transformers resolves `gpt2` on the hub). Datasets never take
      a bare name: `datasets.load_dataset("text")` is a packaged builder that reads files under
      the current directory, not a hub dataset.

    Existence is not checked: the API and the worker may run on different hosts.
    """
    value = value.strip()
    if not value:
        raise SourceError("the path is empty")
    if value.startswith("/"):
        return Source("local", value, _allowed_local_path(value, allowed_local_dirs))
    if value.startswith(("./", "../", "~")) or value in (".", ".."):
        raise SourceError(f"{value!r}: local paths must be absolute")
    if _SCHEME.match(value) and "://" in value or value.lower().startswith("file:"):
        return Source("url", _checked_url(value, allow_urls, url_policy))
    if DATASET_ID.fullmatch(value):
        return Source("dataset", value)
    if not bare_hub_names and _misspelt_dataset_id(value):
        raise SourceError(_no_such_dataset(value))
    if _HUB_ID.fullmatch(value) and ".." not in value and "--" not in value:
        if "/" in value or bare_hub_names:
            return Source("hub", value)
        raise SourceError(
            f"{value!r} is neither an uploaded dataset id ('ds_…'), a hub dataset id (hub "
            "datasets are named 'owner/name', e.g. 'tatsu-lab/alpaca'), nor an absolute path "
            "inside a directory this server allows (TUNERY_ALLOWED_LOCAL_DIRS). To train on "
            f"your own file, {UPLOAD_HINT}"
        )
    raise SourceError(
        f"{value!r} is neither an absolute local path, an https URL, nor a hub id like 'owner/name'"
    )


def uploaded_dataset_id(value: str) -> str:
    """`value` as an uploaded dataset id, by `classify_source`'s rules for them, or
    `SourceError`: for a field that takes nothing but a dataset uploaded to Tunery
    (`data_config.validation_data_path`). Whose dataset it is, the API checks."""
    value = value.strip()
    if DATASET_ID.fullmatch(value):
        return value
    if _misspelt_dataset_id(value):
        raise SourceError(_no_such_dataset(value))
    shown = value if len(value) <= 80 else value[:80] + "…"
    raise SourceError(
        f"{shown!r} is not an uploaded dataset id ('ds_…'): only a dataset uploaded to Tunery "
        "can be named here; upload it with POST /v1/datasets (or GET /v1/upload) and pass the "
        "id it returns"
    )


def _misspelt_dataset_id(value: str) -> bool:
    """A value that means an uploaded dataset but cannot be one."""
    return value.startswith(DATASET_ID_PREFIX) and "/" not in value


def _no_such_dataset(value: str) -> str:
    return (f"no dataset with id {value}: uploaded dataset ids are 'ds_' and 32 hex digits; "
            "GET /v1/datasets lists yours")


def _allowed_local_path(value: str, allowed_local_dirs: Iterable[Path]) -> Path:
    allowed = [Path(d).resolve() for d in allowed_local_dirs]
    if not allowed:
        raise SourceError(
            f"{value!r}: local paths are not allowed on this server "
            "(TUNERY_ALLOWED_LOCAL_DIRS is empty)"
        )
    if "\x00" in value:  # the OS would refuse it with a ValueError, not a SourceError
        raise SourceError(f"{value!r}: a path cannot contain a NUL character")
    # resolve() follows symlinks that exist, so a link inside an allowed dir that points
    # outside it is refused like the target itself would be.
    path = Path(value).resolve()
    if not any(path.is_relative_to(root) for root in allowed):
        # Neither the allowed directories nor a link's target: both are the server's business.
        raise SourceError(
            f"{value!r} is outside the directories this server allows (TUNERY_ALLOWED_LOCAL_DIRS)"
        )
    return path


def _checked_url(value: str, allow_urls: bool, url_policy: UrlPolicy) -> str:
    shown = redact_url(value)
    scheme = urlsplit(value).scheme.lower()
    if not allow_urls and scheme in ("https", "http"):
        raise SourceError(f"{shown!r}: a URL is not allowed here; use a hub id or a local path")
    try:
        check_url(value, url_policy if allow_urls else HTTPS_ONLY)
    except UrlRefused as exc:
        raise SourceError(f"{shown!r}: {exc}") from None
    return value


def check_url_source_resolves(url: str, url_policy: UrlPolicy) -> None:
    """Raise `SourceError` unless `url`'s host resolves, and only to addresses `url_policy`
    allows. The API's check at submit; the worker checks again as it connects."""
    try:
        check_url_resolves(url, url_policy)
    except UrlRefused as exc:
        raise SourceError(f"{redact_url(url)!r}: {exc}") from None


def check_source_type(source: Source, source_type: str) -> None:
    """Raise `SourceError` unless `data_config.data_source_type` fits the classified
    data_path: `s3_presigned_link` reads a URL or an uploaded dataset, never a hub id or a
    local file. An uploaded dataset's id is what `GET /v1/upload` hands out as the
    "presigned" link."""
    if source_type == "s3_presigned_link" and source.kind not in ("url", "dataset"):
        raise SourceError(
            "data_source_type 's3_presigned_link' needs an https URL or an uploaded dataset "
            f"id as data_path, got {source.value!r}"
        )
