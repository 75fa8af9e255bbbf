"""The streaming dataset readers the API validates uploads with and the worker trains from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared import dataset_files
from shared.dataset_files import (
    DatasetFileError,
    FileRows,
    detect_format,
    read_file,
    summarize_file,
)
from shared.datasets import safe_file_name
from shared.sources import Source, classify_source

ROWS = [{"a": i, "b": "é" * (i % 7)} for i in range(300)]


@pytest.mark.parametrize("chunk", [5, 64, 1 << 20])
def test_json_array_is_read_element_by_element_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(dataset_files, "_CHUNK_BYTES", chunk)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2, ensure_ascii=False), encoding="utf-8-sig")

    assert read_file(path).rows == ROWS
    summary = summarize_file(path, "json", name="d.json", keep_rows=3)
    assert (summary.rows, summary.columns, summary.first_rows) == (300, ["a", "b"], ROWS[:3])


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_json_error_names_the_line_and_column_wherever_the_chunks_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(dataset_files, "_CHUNK_BYTES", chunk)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS[:3], indent=2).replace('"a": 2', '"a": 2,,'))

    with pytest.raises(DatasetFileError, match=r"d.json line 11 column 12: invalid JSON"):
        read_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"a": 1}, 3]', "row 2 (line 1): expected a JSON object"),
        ('[{"a": 1}] trailing', "extra data after the JSON array"),
        ('[{"a": 1}, {"a": 2}', "ends before the array is closed"),
        ('{\n  "a": [1, 2]\n}', "expected a JSON array of objects (one per row) or JSON lines"),
        ("", "is empty"),
    ],
)
def test_malformed_json_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text)

    with pytest.raises(DatasetFileError, match=re.escape(message)):
        read_file(path)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("d.jsonl", b'{"a": 1}\n\n{"a": "\xff"}\n'),
        ("d.csv", b"a\n1\n\xff\n"),
        ("d.json", b'[{"a": 1},\n{"a": 2},\n{"a": "\xff"}]'),
    ],
)
def test_bytes_that_are_not_utf8_are_reported_by_line(
    tmp_path: Path, name: str, data: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(data)

    with pytest.raises(DatasetFileError, match=rf"{name} line 3: not UTF-8 text"):
        read_file(path)


def test_csv_quoted_fields_may_span_lines_and_keep_their_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbfq,a\r\n"two\r\nlines",x\r\n')

    assert read_file(path).rows == [{"q": "two\r\nlines", "a": "x"}]


def test_summary_keeps_only_the_rows_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    summary = summarize_file(path, "jsonl", name="d.jsonl", keep_rows=2)

    assert (summary.rows, summary.first_rows) == (300, ROWS[:2])


def test_format_comes_from_name_then_content_type_then_content(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b'  [{"a": 1}]')

    assert detect_format(path, "x.ndjson") == "jsonl"
    assert detect_format(path, "x", "text/csv; charset=utf-8") == "csv"
    assert detect_format(path, "x", "application/octet-stream") == "json"


@pytest.mark.parametrize(
    ("given", "fmt", "safe"),
    [
        ("train.jsonl", "jsonl", "train.jsonl"),
        ("../../etc/passwd", "csv", "passwd.csv"),
        ("C:\\data\\my file.csv", "csv", "my_file.csv"),
        ("résumé.json", "json", "resume.json"),
        (".hidden", None, "hidden"),
        ("", "parquet", "dataset.parquet"),
        ("data.txt", "csv", "data.txt.csv"),
        ("x" * 300 + ".jsonl", None, "x" * 94 + ".jsonl"),
    ],
)
def test_safe_file_name_keeps_one_harmless_segment_with_the_format_suffix(
    given: str, fmt: str | None, safe: str
) -> None:
    assert safe_file_name(given, fmt) == safe


def test_dataset_ids_are_their_own_source_kind() -> None:
    dataset_id = "ds_" + "0123456789abcdef" * 2

    assert classify_source(dataset_id, []) == Source("dataset", dataset_id)
    assert classify_source("ds_notanid", [], bare_hub_names=True).kind == "hub"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_streamed_rows_are_read_from_the_file_on_each_pass(tmp_path: Path, fmt: str) -> None:
    rows = [{"a": str(i), "b": f"row {i}"} for i in range(50)]
    path = tmp_path / f"d.{fmt}"
    write_rows(path, fmt, rows)

    dataset = read_file(path, stream=True)

    assert isinstance(dataset.rows, FileRows) and len(dataset.rows) == 50
    assert dataset.columns == ["a", "b"]
    assert [dict(r) for r in dataset.rows] == rows
    assert [dict(r) for r in dataset.rows] == rows  # a second pass reads it again
    assert dict(dataset.rows[7]) == rows[7] and dict(dataset.rows[-1]) == rows[-1]
    write_rows(path, fmt, rows[:-1])
    with pytest.raises(DatasetFileError, match="changed while it was read: 50 rows when "
                                               "checked, 49 now"):
        list(dataset.rows)


def write_rows(path: Path, fmt: str, rows: list[dict[str, str]]) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("a,b\n" + "".join(f"{r['a']},{r['b']}\n" for r in rows))
