"""Reading dataset files: json, jsonl, csv and parquet, one row at a time.

The API validates uploads with these readers and the worker loads training data with them, so
a file accepted at upload is read the same way at training time. Every reader streams: a
summary of a 1 GiB upload keeps a few rows in memory, not the file. Parse errors name the file
and the line (or parquet row), because the user has to find and fix them. A CSV file is read
with the delimiter its header line uses (`shared.csv_files`).

Pure standard library plus pyarrow, imported only for parquet; never torch or `datasets`.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shared import local_files
from shared.csv_files import describe_delimiter, sniff_delimiter

__all__ = [
    "CONTENT_TYPES",
    "FORMATS",
    "DatasetFileError",
    "FileRows",
    "FileSummary",
    "LoadedDataset",
    "TooManyRows",
    "compression_of",
    "detect_format",
    "format_of_content_type",
    "format_of_name",
    "read_file",
    "read_local",
    "sniff_format",
    "summarize_file",
]

Row = Mapping[str, Any]

FORMATS = ("jsonl", "json", "csv", "parquet")
CONTENT_TYPES = {
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/jsonlines": "jsonl",
    "application/json": "json",
    "text/csv": "csv",
    "application/csv": "csv",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}

_CHUNK_BYTES = 1 << 20
_WHITESPACE = re.compile(r"[ \t\r\n]*")
MAX_NESTING = 64
"""Deepest nesting of objects and arrays a JSON or parquet row may have, the row itself being
level 1. Deeper rows are refused with the line: nothing a template renders needs them, and
every later walk of a row (the stored sample, a template cell) stays shallow."""


class DatasetFileError(ValueError):
    """A data file that cannot be read; the message names the file and the line or row."""


def max_row_bytes() -> int:
    """The longest row a file may have (TUNERY_MAX_ROW_BYTES): a JSON line, a CSV record or a
    JSON array element. Readers hold one row of this size at most, never a whole line of any
    length, so parsing a file takes memory in proportion to this, not to the file."""
    from shared.settings import get_settings

    return get_settings().limits.max_row_bytes


def _row_too_long(name: str, where: str, limit: int, unit: str = "bytes") -> DatasetFileError:
    return DatasetFileError(
        f"{name} {where}: the row is longer than {limit} {unit}, the longest this server "
        "accepts (TUNERY_MAX_ROW_BYTES)"
    )


def _too_deep(name: str, where: str) -> DatasetFileError:
    return DatasetFileError(
        f"{name} {where}: the row nests objects or arrays deeper than {MAX_NESTING} levels, "
        "the most this server accepts"
    )


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests dicts and lists more than `limit` levels; iterative, so no depth
    can overflow the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list | tuple))
    return False


class TooManyRows(DatasetFileError):
    """The file has more rows than the reader was allowed to read."""

    def __init__(self, name: str, max_rows: int) -> None:
        super().__init__(
            f"{name} has more than {max_rows} rows, the most this server accepts "
            "(TUNERY_MAX_DATASET_ROWS)"
        )
        self.max_rows = max_rows


# Compressed files are not read: their size says nothing about what they expand to, and
# parsing their bytes as CSV would only produce a confusing error. Parquet compresses inside
# the format and starts with b"PAR1", so it never matches.
_COMPRESSED_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
)


def compression_of(path: Path) -> str | None:
    """The compression format the file's first bytes announce, or None."""
    with path.open("rb") as f:
        head = f.read(16)
    for magic, kind in _COMPRESSED_MAGIC:
        # "BZh" alone could begin a CSV header; bzip2 adds a block size digit and the
        # block magic 0x314159265359.
        if kind == "bzip2" and not (head[3:4].isdigit() and head[4:10] == b"1AY&SY"):
            continue
        if head.startswith(magic):
            return kind
    return None


@dataclass
class LoadedDataset:
    """Rows (dicts, or a `datasets.Dataset`, which iterates as dicts) and their column names;
    `csv_delimiters`: the delimiter each CSV file read was read with, by file name."""

    columns: list[str]
    rows: Sequence[Row]
    origin: str
    csv_delimiters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FileSummary:
    """What an upload check needs: the row count, the columns and the first few rows."""

    format: str
    rows: int
    columns: list[str]
    first_rows: list[dict[str, Any]]
    csv_delimiter: str | None = None
    """The delimiter a CSV file was read with (`shared.csv_files`); None for other formats."""


def format_of_name(name: str) -> str | None:
    """The format a file name's suffix says (`.ndjson` counts as jsonl), or None."""
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"ndjson": "jsonl"}.get(suffix, suffix) if suffix in (*FORMATS, "ndjson") else None


def format_of_content_type(content_type: str | None) -> str | None:
    return CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower())


def sniff_format(path: Path) -> str:
    """Guess the format from the first bytes; CSV when nothing else fits."""
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


def detect_format(path: Path, name: str | None = None, content_type: str | None = None) -> str:
    """The file name's suffix, else the Content-Type, else the first bytes decide."""
    return (
        format_of_name(name if name is not None else path.name)
        or format_of_content_type(content_type)
        or sniff_format(path)
    )


def read_local(path: Path, allowed_dirs: Iterable[Path], *, shown: str | None = None
               ) -> LoadedDataset:
    """A file, or every data file of a directory in name order (columns merged).

    Each file is opened first and read only if the opened file lies inside `allowed_dirs`
    (`shared.local_files`): a link inside the directory cannot lead elsewhere. Errors name
    the file as `shown` (the user's data_path; default: `path`) and the entry below it."""
    shown = shown or str(path)
    directory = path.is_dir()
    try:
        with _opened_local(path, allowed_dirs, shown=shown, directory=directory) as files:
            # A file's format comes from the name it resolved to; a directory's files from theirs.
            parts = [read_file(f.reopen, format_of_name(f.name if directory else path.name),
                               name=f.name) for f in files]
    except local_files.LocalFileRefused as exc:
        raise DatasetFileError(f"data_path {exc}") from None
    if not directory:
        return parts[0]
    columns = list(dict.fromkeys(c for part in parts for c in part.columns))
    rows = [row for part in parts for row in part.rows]
    delimiters = {name: d for part in parts for name, d in part.csv_delimiters.items()}
    return LoadedDataset(columns, rows, shown, delimiters)


@contextmanager
def _opened_local(
    path: Path, allowed_dirs: Iterable[Path], *, shown: str, directory: bool
) -> Iterator[list[local_files.OpenedFile]]:
    """The file `path`, or every data file of the `directory` in name order, each opened and
    verified; the file named `shown` (a directory's files by their own names)."""
    if not directory:
        with local_files.open_file(path, allowed_dirs, shown=shown) as opened:
            yield [opened]
        return
    with local_files.open_tree(path, allowed_dirs, shown=shown, recursive=False,
                               wanted=lambda name: format_of_name(name) is not None) as tree:
        if not tree.files:
            raise DatasetFileError(f"{shown} has no {'/'.join(FORMATS)} files")
        yield tree.files


def read_file(path: Path, fmt: str | None = None, *, name: str | None = None,
              max_rows: int | None = None, stream: bool = False) -> LoadedDataset:
    """Parse one json/jsonl/csv/parquet file, every row; the format comes from the suffix
    unless given. `name` is how errors call the file (default: its file name). More than
    `max_rows` rows raise `TooManyRows` as soon as the next one is read.

    With `stream`, the file is checked and counted here but its rows are read again each
    time they are iterated (`FileRows`), so they are never all in memory; the file must stay
    where it is while the dataset is used."""
    name = name or path.name
    fmt = fmt or format_of_name(path.name)
    if fmt is None:
        raise DatasetFileError(f"{name}: unknown format; use one of {', '.join(FORMATS)}")
    rows: list[dict[str, Any]] = []
    columns, count, delimiter = _scan(path, fmt, name, rows, keep=0 if stream else None,
                                      max_rows=max_rows)
    delimiters = {name: delimiter} if delimiter else {}
    if stream:
        return LoadedDataset(columns, FileRows(path, fmt, name, count), name, delimiters)
    return LoadedDataset(columns, rows, name, delimiters)


class FileRows(Sequence[Row]):
    """The rows of a file `_scan` checked, read from the file again on each pass: as dicts, a
    million rows held about twice the file in memory for as long as the data phase ran.
    A pass that finds another row count than the check raises `DatasetFileError`: the file
    changed since."""

    def __init__(self, path: Path, fmt: str, name: str, count: int) -> None:
        self.path, self.fmt, self.name, self.rows = path, fmt, name, count

    def __len__(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[Row]:
        seen = 0
        for row in _rows(self.path, self.fmt, self.name, [], max_row_bytes()):
            seen += 1
            if seen > self.rows:
                break
            yield row
        if seen != self.rows:
            raise DatasetFileError(
                f"{self.name} changed while it was read: {self.rows} rows when checked, "
                f"{'more' if seen > self.rows else seen} now"
            )

    def __getitem__(self, index: int | slice) -> Any:
        """By position, reading the file up to it: for the odd look, never for a pass."""
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += self.rows
        if not 0 <= index < self.rows:
            raise IndexError(index)
        return next(itertools.islice(iter(self), index, None))

    def __eq__(self, other: object) -> bool:
        return list(self) == other if isinstance(other, Sequence) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


def summarize_file(path: Path, fmt: str, *, name: str, keep_rows: int = 5,
                   max_rows: int | None = None,
                   each_row: Callable[[dict[str, Any]], None] | None = None) -> FileSummary:
    """Read the whole file to validate it, keeping only the first `keep_rows` rows; more than
    `max_rows` rows raise `TooManyRows`. `each_row` sees every row as it is read, so a further
    check of the rows needs no second pass."""
    if fmt not in FORMATS:
        raise DatasetFileError(f"{name}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    kept: list[dict[str, Any]] = []
    columns, count, delimiter = _scan(path, fmt, name, kept, keep=keep_rows, max_rows=max_rows,
                                      each_row=each_row)
    return FileSummary(fmt, count, columns, kept, delimiter)


def _scan(
    path: Path, fmt: str, name: str, kept: list[dict[str, Any]], keep: int | None,
    max_rows: int | None = None, each_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[str], int, str | None]:
    """Walk every row, append the first `keep` (None: all) to `kept`; return columns, count
    and, for CSV, the delimiter.

    Columns are the header (csv) or schema (parquet); for JSON, every key seen, in order.
    """
    compression = compression_of(path)
    if compression is not None:
        raise DatasetFileError(
            f"{name} is a {compression}-compressed file; compressed datasets are not accepted: "
            f"decompress it and send the {'/'.join(FORMATS)} file itself"
        )
    header: list[str] = []
    limit = max_row_bytes()
    delimiter = _csv_delimiter(path, name, limit) if fmt == "csv" else None
    rows = _rows(path, fmt, name, header, limit)
    seen: dict[str, None] = {}
    count = 0
    for row in rows:
        count += 1
        if max_rows is not None and count > max_rows:
            raise TooManyRows(name, max_rows)
        if fmt == "parquet" and _nested_deeper_than(row, MAX_NESTING):
            raise _too_deep(name, f"row {count}")
        if keep is None or len(kept) < keep:
            kept.append(row)
        if each_row is not None:
            each_row(row)
        if not header:
            seen.update(dict.fromkeys(row))
    return (header or list(seen)), count, delimiter


def _rows(path: Path, fmt: str, name: str, header: list[str], limit: int
          ) -> Iterator[dict[str, Any]]:
    """Every row of the file as it is read; `header` gets the csv header or parquet schema."""
    if fmt == "parquet":
        return _parquet_rows(path, name, header)
    if fmt == "csv":
        return _csv_rows(path, name, header, limit, _csv_delimiter(path, name, limit))
    if fmt == "json":
        return _json_rows(path, name, limit)
    if fmt == "jsonl":
        return _jsonl_rows(path, name, limit)
    raise DatasetFileError(f"{name}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _not_utf8(name: str, line: int) -> DatasetFileError:
    return DatasetFileError(f"{name} line {line}: not UTF-8 text")


def _utf8_lines(f: IO[bytes], name: str, limit: int) -> Iterator[str]:
    """Lines with their line ends, decoded one by one so a bad byte is reported by line (a
    text-mode file decodes ahead in 8 KiB blocks and cannot say where). A line longer than
    `limit` bytes (its line end included) is refused after reading `limit + 1` of them."""
    number = 0
    while raw := f.readline(limit + 1):
        number += 1
        if len(raw) > limit:
            raise _row_too_long(name, f"line {number}", limit)
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise _not_utf8(name, number) from None


def _jsonl_rows(
    path: Path, name: str, limit: int, *, from_json: bool = False
) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        first = True
        for number, line in enumerate(_utf8_lines(f, name, limit), start=1):
            if not line.strip():
                continue
            if first and not from_json and line.lstrip().startswith("["):
                raise _array_not_json_lines(name, number)
            first = False
            try:
                row = json.loads(line)
            except RecursionError:
                raise _too_deep(name, f"line {number}") from None
            except json.JSONDecodeError as exc:
                hint = ""
                if from_json and number == 1:
                    hint = "; expected a JSON array of objects (one per row) or JSON lines"
                raise DatasetFileError(
                    f"{name} line {number}: invalid JSON at column {exc.colno} ({exc.msg}){hint}"
                ) from None
            if not isinstance(row, dict):
                raise DatasetFileError(
                    f"{name} line {number}: expected a JSON object, got {line.strip()[:60]!r}"
                )
            if _nested_deeper_than(row, MAX_NESTING):
                raise _too_deep(name, f"line {number}")
            yield row


def _array_not_json_lines(name: str, line: int) -> DatasetFileError:
    return DatasetFileError(
        f"{name} line {line}: the file is a JSON array ('[' ... ']'), not JSON Lines: a "
        "JSON Lines file (.jsonl) holds one JSON object per line, with no brackets around "
        "them. Rename it to .json to send it as a JSON array of objects, or write one object "
        "per line"
    )


def _csv_delimiter(path: Path, name: str, limit: int) -> str:
    """The delimiter of the CSV file's header line, its first line that is not blank."""
    with path.open("rb") as f:
        header_line = next((line for line in _utf8_lines(f, name, limit) if line.strip()), "")
    return sniff_delimiter(header_line)


def _csv_rows(
    path: Path, name: str, header: list[str], limit: int, delimiter: str
) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        # Lines keep their line ends, so quoted fields may hold line breaks; a record of many
        # lines is bounded as a whole.
        record = _RecordBudget(_utf8_lines(f, name, limit), name, limit)
        reader = csv.reader(record, delimiter=delimiter, strict=True)
        try:
            # Blank lines are no records, before the header as after it.
            header.extend(next((fields for fields in reader if fields), []))
            record.start()
            for fields in reader:
                record.start()
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DatasetFileError(
                        f"{name} line {reader.line_num}: the row has "
                        f"{_plural(len(fields), 'field')} but the header line has {len(header)}; "
                        f"fields are split at each {describe_delimiter(delimiter)}, the "
                        "delimiter the header line uses, so quote a field that contains one"
                    )
                yield dict(zip(header, fields, strict=True))
        except csv.Error as exc:
            raise DatasetFileError(
                f"{name} line {reader.line_num}: invalid CSV ({exc})"
            ) from None


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _parquet_rows(path: Path, name: str, header: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(path) as parquet:
            header.extend(parquet.schema_arrow.names)
            for batch in parquet.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield record
    except (pyarrow.ArrowException, OSError) as exc:
        where = f" at row {row + 1}" if row else ""
        raise DatasetFileError(f"{name}: not a readable parquet file{where} ({exc})") from None


class _RecordBudget:
    """The lines of a CSV file, refusing a record (possibly many quoted lines) longer than
    `limit` characters; `start` marks where the next record begins."""

    def __init__(self, lines: Iterator[str], name: str, limit: int) -> None:
        self.lines, self.name, self.limit = lines, name, limit
        self.line = self.first_line = self.used = 0

    def start(self) -> None:
        self.used, self.first_line = 0, self.line + 1

    def __iter__(self) -> _RecordBudget:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.line += 1
        self.used += len(line)
        if self.used > self.limit:
            raise _row_too_long(
                self.name, f"line {self.first_line or 1}", self.limit, "characters"
            )
        return line


def _json_rows(path: Path, name: str, limit: int) -> Iterator[dict[str, Any]]:
    """A JSON array of objects, decoded element by element; files named .json that hold
    JSON lines (a common mix-up) are read as JSON lines."""
    with path.open("rb") as f:
        text = _TextCursor(f, name, limit)
        first = text.skip_whitespace()
        if first == "[":
            yield from _json_array_rows(text, name)
            return
    if first == "{":
        yield from _jsonl_rows(path, name, limit, from_json=True)
        return
    if first == "":
        raise DatasetFileError(f"{name} is empty")
    raise DatasetFileError(
        f"{name} line 1: expected a JSON array of objects (one per row) or JSON lines"
    )


def _json_array_rows(text: _TextCursor, name: str) -> Iterator[dict[str, Any]]:
    decoder = json.JSONDecoder()
    text.advance(1)  # the "["
    number = 0
    if text.skip_whitespace() == "]":
        text.advance(1)
    else:
        while True:
            text.skip_whitespace()
            line = text.line
            number += 1
            where = f"row {number} (line {line})"
            row = text.decode(decoder, where)
            if not isinstance(row, dict):
                raise DatasetFileError(
                    f"{name} {where}: expected a JSON object, got {type(row).__name__}"
                )
            if _nested_deeper_than(row, MAX_NESTING):
                raise _too_deep(name, where)
            yield row
            separator = text.skip_whitespace()
            if separator == "":
                raise text.error("the file ends before the array is closed with ']'")
            if separator == "]":
                text.advance(1)
                break
            if separator != ",":
                raise text.error("expected ',' or ']' after an array element")
            text.advance(1)
    if text.skip_whitespace() != "":
        raise text.error("extra data after the JSON array")


class _TextCursor:
    """A read position in a text stream with a bounded buffer and a line counter, enough to
    decode a JSON array one element at a time with `JSONDecoder.raw_decode`. An element may
    be at most `limit` characters: the buffer never grows much past that."""

    def __init__(self, stream: IO[bytes], name: str, limit: int) -> None:
        self.stream, self.name, self.limit = stream, name, limit
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def _fill(self) -> bool:
        """Read one more chunk, dropping what was consumed; False at end of file."""
        if self.eof:
            return False
        data = self.stream.read(_CHUNK_BYTES)
        try:
            chunk = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            lines = self.line + self.buf.count("\n", self.pos) + data.count(b"\n", 0, exc.start)
            raise _not_utf8(self.name, lines) from None
        if not data:
            self.eof = True
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return bool(chunk) or not self.eof

    def advance(self, n: int) -> None:
        self.line += self.buf.count("\n", self.pos, self.pos + n)
        self.pos += n

    def skip_whitespace(self) -> str:
        """Move past whitespace; return the next character, or "" at end of file."""
        while True:
            match = _WHITESPACE.match(self.buf, self.pos)
            assert match is not None  # `*` matches the empty string
            self.advance(match.end() - self.pos)
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def decode(self, decoder: json.JSONDecoder, where: str) -> Any:
        """The JSON value at the read position, `where` naming it in errors."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise _too_deep(self.name, where) from None
            except json.JSONDecodeError as exc:
                # Positions first: reading more moves the buffer under exc.pos.
                line = self.line + self.buf.count("\n", self.pos, exc.pos)
                column = exc.pos - max(self.buf.rfind("\n", 0, exc.pos), -1)
                error = DatasetFileError(
                    f"{self.name} line {line} column {column}: invalid JSON ({exc.msg})"
                )
                # The element may just continue in the next chunk; read more and retry
                # unless the file ended or the element is already longer than a row may be.
                if len(self.buf) - self.pos <= self.limit and self._fill():
                    continue
                if len(self.buf) - self.pos > self.limit:
                    raise DatasetFileError(
                        f"{self.name} {where}: the row is not complete within {self.limit} "
                        "characters, the longest row this server accepts "
                        f"(TUNERY_MAX_ROW_BYTES), or is invalid JSON ({error})"
                    ) from None
                raise error from None
            if end - self.pos > self.limit:
                raise _row_too_long(self.name, where, self.limit, "characters")
            self.advance(end - self.pos)
            return value

    def error(self, message: str) -> DatasetFileError:
        return DatasetFileError(f"{self.name} line {self.line}: invalid JSON ({message})")

