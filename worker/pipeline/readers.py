"""Reading rows: local json/jsonl/csv/parquet files and directories, https downloads, hub ids.

Parse errors name the file and line, because the user has to find and fix them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shared.sources import redact_url, url_file_name
from worker.pipeline.errors import PipelineError

LogFn = Callable[[str], None]
Row = Mapping[str, Any]

FORMATS = ("jsonl", "json", "csv", "parquet")
MAX_DOWNLOAD_BYTES = 20 * 1024**3
_CONTENT_TYPES = {
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/jsonlines": "jsonl",
    "application/json": "json",
    "text/csv": "csv",
    "application/csv": "csv",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}


def _no_log(line: str) -> None:
    pass


@dataclass
class LoadedDataset:
    """Rows (dicts, or a `datasets.Dataset`, which iterates as dicts) and their column names."""

    columns: list[str]
    rows: Sequence[Row]
    origin: str


def read_local(path: Path) -> LoadedDataset:
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and _format_of(p.name) is not None
        )
        if not files:
            raise PipelineError(f"{path} has no {'/'.join(FORMATS)} files")
        parts = [read_file(p) for p in files]
        columns = list(dict.fromkeys(c for part in parts for c in part.columns))
        rows = [row for part in parts for row in part.rows]
        return LoadedDataset(columns, rows, str(path))
    raise PipelineError(f"data_path {str(path)!r} does not exist")


def _format_of(name: str) -> str | None:
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"ndjson": "jsonl"}.get(suffix, suffix) if suffix in (*FORMATS, "ndjson") else None


def read_file(path: Path, fmt: str | None = None) -> LoadedDataset:
    """Parse one json/jsonl/csv/parquet file; the format comes from the suffix unless given."""
    fmt = fmt or _format_of(path.name)
    if fmt is None:
        raise PipelineError(f"{path.name}: unknown format; use one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path.name} is not UTF-8 text (byte {exc.start})") from None
    if fmt == "csv":
        return _read_csv(text, path.name)
    if fmt == "json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            # Files named .json are often JSON lines; "Extra data" after the first object
            # is how that looks to a whole-document parser.
            if exc.msg != "Extra data":
                raise PipelineError(
                    f"{path.name} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})"
                ) from None
            return _read_jsonl(text, path.name)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise PipelineError(
                f"{path.name}: expected a JSON array of objects (one per row) or JSON lines"
            )
        return LoadedDataset(_columns(records), records, path.name)
    return _read_jsonl(text, path.name)


def _columns(rows: Iterable[Row]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _read_jsonl(text: str, name: str) -> LoadedDataset:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(
                f"{name} line {number}: invalid JSON at column {exc.colno} ({exc.msg})"
            ) from None
        if not isinstance(row, dict):
            raise PipelineError(f"{name} line {number}: expected a JSON object, got {line[:60]!r}")
        rows.append(row)
    return LoadedDataset(_columns(rows), rows, name)


def _read_csv(text: str, name: str) -> LoadedDataset:
    reader = csv.DictReader(text.splitlines(), strict=True)
    rows: list[dict[str, Any]] = []
    try:
        for row in reader:
            # DictReader files surplus fields under the key None and fills missing ones with
            # None: either way the row does not match the header.
            if None in row or None in row.values():
                raise PipelineError(
                    f"{name} line {reader.line_num}: the row's number of fields differs from "
                    f"the header's {len(reader.fieldnames or [])}"
                )
            rows.append(row)
    except csv.Error as exc:
        raise PipelineError(f"{name} line {reader.line_num}: invalid CSV ({exc})") from None
    return LoadedDataset(list(reader.fieldnames or []), rows, name)


def _read_parquet(path: Path) -> LoadedDataset:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise PipelineError(f"{path.name}: not a readable parquet file ({exc})") from None
    return LoadedDataset(table.column_names, table.to_pylist(), path.name)


def download_url(
    url: str, dest_dir: Path, *, client: httpx.Client | None = None, log: LogFn = _no_log
) -> Path:
    """Download an https URL into `dest_dir` and return the file, its suffix the format.

    The format comes from the URL's file name, else the Content-Type, else the first bytes.
    Log lines and errors never show the query string (a presigned URL's signature).
    """
    shown = redact_url(url)
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest_dir / "download.part"
    own_client = client is None
    client = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=300.0))
    try:
        with client.stream("GET", url) as response:
            if response.url.scheme != "https":
                raise PipelineError(f"{shown} redirected to a non-https URL; refusing it")
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
    fmt = (
        _format_of(url_file_name(url))
        or _CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        or _sniff_format(partial)
    )
    path = dest_dir / f"dataset.{fmt}"
    partial.replace(path)
    log(f"downloaded {shown}: {size} bytes, read as {fmt}")
    return path


def _sniff_format(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "jsonl"
    return "csv"


def load_hub_dataset(dataset_id: str, subset: str | None, *, token: str | None) -> LoadedDataset:
    """`datasets.load_dataset(dataset_id, subset)`, its "train" split (or its only one)."""
    # datasets.load_dataset reads a local directory of the same name first; a hub id must
    # never become a way around allowed_local_dirs.
    if Path(dataset_id).exists():
        raise PipelineError(
            f"hub dataset id {dataset_id!r} is also a path on the worker; refusing the ambiguity"
        )
    import datasets

    label = dataset_id + (f" (subset {subset})" if subset else "")
    try:
        loaded = datasets.load_dataset(dataset_id, subset, token=token)
    except Exception as exc:  # any failure here means "this dataset cannot be read"
        raise PipelineError(
            f"could not load hub dataset {label}: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        name = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[name]
    return LoadedDataset(list(loaded.column_names), loaded, label)
