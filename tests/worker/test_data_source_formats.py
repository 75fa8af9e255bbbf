"""The worker reads CSV files with their header line's delimiter, local or downloaded, and
says so; a JSON array named .jsonl fails the job saying what it is."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from worker.pipeline.data_source import load_dataset
from worker.pipeline.errors import PipelineError

SEMICOLONS = b"instruction;input;output\r\nAdd 2, 3.;;5\r\nName it.;x;y\r\n"
ROWS = [
    {"instruction": "Add 2, 3.", "input": "", "output": "5"},
    {"instruction": "Name it.", "input": "x", "output": "y"},
]
NOTE = "CSV read with semicolon (';') between fields, the delimiter its header line uses"


def test_a_local_semicolon_csv_is_read_with_semicolons_and_logged(tmp_path: Path) -> None:
    path = tmp_path / "sheet.csv"
    path.write_bytes(SEMICOLONS)
    lines: list[str] = []

    dataset = load_dataset(str(path), allowed_local_dirs=[tmp_path], download_dir=tmp_path / "dl",
                           log=lines.append)

    assert [dict(r) for r in dataset.rows] == ROWS
    assert f"dataset sheet.csv: {NOTE}" in lines


def test_a_csv_url_is_sniffed_like_a_local_file(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=SEMICOLONS, headers={"content-type": "text/csv"})

    lines: list[str] = []
    client = httpx.Client(transport=httpx.MockTransport(handler))
    dataset = load_dataset("https://data.example.com/export?sig=secret", allowed_local_dirs=[],
                           download_dir=tmp_path / "dl", client=client, log=lines.append)

    assert [dict(r) for r in dataset.rows] == ROWS
    assert f"dataset https://data.example.com/export?…: {NOTE}" in lines


def test_each_csv_of_a_directory_is_read_with_its_own_delimiter(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.csv").write_text("instruction,input,output\nAdd 2 and 3.,,5\n")
    (folder / "b.csv").write_text("instruction\tinput\toutput\nName it.\tx\ty\n")
    lines: list[str] = []

    dataset = load_dataset(str(folder), allowed_local_dirs=[tmp_path],
                           download_dir=tmp_path / "dl", log=lines.append)

    assert [dict(r)["output"] for r in dataset.rows] == ["5", "y"]
    delimiter_lines = [line for line in lines if "between fields" in line]
    assert delimiter_lines == [
        f"dataset {folder}/b.csv: CSV read with tab ('\\t') between fields, the delimiter its "
        "header line uses"
    ]


def test_a_comma_csv_logs_no_delimiter_line(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("instruction,input,output\na,b,c\n")
    lines: list[str] = []

    load_dataset(str(path), allowed_local_dirs=[tmp_path], download_dir=tmp_path / "dl",
                 log=lines.append)

    assert not [line for line in lines if "between fields" in line]


def test_a_json_array_named_jsonl_fails_the_job_saying_it_is_an_array(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS))

    with pytest.raises(PipelineError) as info:
        load_dataset(str(path), allowed_local_dirs=[tmp_path], download_dir=tmp_path / "dl")

    assert str(info.value).startswith("train.jsonl line 1: the file is a JSON array")
    assert "one JSON object per line" in str(info.value)
