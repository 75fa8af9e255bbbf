"""CSV files are read with the delimiter their header line uses; JSON arrays are told apart from
JSON Lines. The readers the API validates uploads with and the worker trains from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared.csv_files import sniff_delimiter
from shared.dataset_files import DatasetFileError, read_file, summarize_file


@pytest.mark.parametrize(
    ("header", "delimiter"),
    [
        ("instruction,input,output\n", ","),
        ("instruction;input;output\r\n", ";"),
        ("instruction\tinput\toutput\n", "\t"),
        ('"question; long",answer\n', ","),  # a delimiter inside quotes does not count
        ('"a,b";"c,d";e\n', ";"),
        ("a;b;c, with a comma\n", ";"),  # the one that occurs most
        ("a;b,c\n", ","),  # a tie: comma
        ("text\n", ","),  # one column: comma
        ("", ","),
    ],
)
def test_the_header_line_decides_the_delimiter(header: str, delimiter: str) -> None:
    assert sniff_delimiter(header) == delimiter


def test_semicolon_csv_is_read_with_its_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    # As Excel writes it where the decimal separator is a comma: BOM, CRLF, semicolons.
    path.write_bytes(
        b'\xef\xbb\xbfinstruction;output\r\nSay hi, politely.;Hello, dear.\r\n"a;b";"2,5"\r\n'
    )

    loaded = read_file(path)
    summary = summarize_file(path, "csv", name="excel.csv")

    assert loaded.columns == summary.columns == ["instruction", "output"]
    assert loaded.rows == [
        {"instruction": "Say hi, politely.", "output": "Hello, dear."},
        {"instruction": "a;b", "output": "2,5"},
    ]
    assert summary.csv_delimiter == ";" and loaded.csv_delimiters == {"excel.csv": ";"}


def test_tab_separated_csv_is_read_with_tabs(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("\ninstruction\toutput\nAdd 2, 3.\t5\n\nName it.\tx;y\n")

    summary = summarize_file(path, "csv", name="export.csv")

    assert (summary.csv_delimiter, summary.rows, summary.columns) == (
        "\t", 2, ["instruction", "output"])
    assert summary.first_rows[1] == {"instruction": "Name it.", "output": "x;y"}


def test_a_comma_csv_reports_its_comma_and_other_formats_none(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n')

    assert summarize_file(tmp_path / "d.csv", "csv", name="d.csv").csv_delimiter == ","
    assert summarize_file(tmp_path / "d.jsonl", "jsonl", name="d.jsonl").csv_delimiter is None
    assert read_file(tmp_path / "d.jsonl").csv_delimiters == {}


def test_a_row_split_differently_from_its_header_names_the_line_and_the_delimiter(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mixed.csv"
    # Semicolons in the header, commas in the rows: the header line decides.
    path.write_text("instruction;output\nSay hi;Hello\nSay bye,Goodbye\n")

    with pytest.raises(DatasetFileError) as info:
        read_file(path)

    assert str(info.value).startswith(
        "mixed.csv line 3: the row has 1 field but the header line has 2; fields are split at "
        "each semicolon (';')"
    )


@pytest.mark.parametrize(
    "text",
    [json.dumps([{"a": 1}, {"a": 2}]), json.dumps([{"a": 1}, {"a": 2}], indent=2)],
)
def test_a_json_array_in_a_jsonl_file_says_it_is_an_array(tmp_path: Path, text: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n" + text)

    with pytest.raises(DatasetFileError) as info:
        read_file(path)

    message = str(info.value)
    assert message.startswith("train.jsonl line 2: the file is a JSON array")
    assert "one JSON object per line" in message and "Rename it to .json" in message
    # The advice holds: the same file named .json is read.
    renamed = path.rename(tmp_path / "train.json")
    assert read_file(renamed).rows == [{"a": 1}, {"a": 2}]


def test_a_later_jsonl_line_that_is_an_array_is_still_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')

    with pytest.raises(DatasetFileError, match=re.escape("line 2: expected a JSON object")):
        read_file(path)
