"""Uploads in the shapes spreadsheets and hand-edited files come in: CSV with semicolons or
tabs, a JSON array named .jsonl. Real app, SQLite database, local storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.test_datasets import upload
from tests.conftest import make_payload

ROWS = [("Add 2, 3.", "", "5"), ("Name a colour.", "warm", "red; or orange")]


def separated(delimiter: str) -> bytes:
    lines = [delimiter.join(("instruction", "input", "output"))]
    lines += [delimiter.join(f'"{v}"' if delimiter in v else v for v in row) for row in ROWS]
    return ("\r\n".join(lines) + "\r\n").encode()


@pytest.mark.parametrize(("delimiter", "content_type"), [(";", None), ("\t", "text/csv")])
def test_semicolon_or_tab_csv_upload_is_read_and_its_delimiter_shown(
    client: TestClient, delimiter: str, content_type: str | None
) -> None:
    response = upload(client, separated(delimiter), "sheet.csv", content_type)

    assert response.status_code == 201, response.text
    created = response.json()
    assert created["csv_delimiter"] == delimiter
    assert created["columns"] == ["instruction", "input", "output"]
    assert created["first_rows"][0] == {"instruction": "Add 2, 3.", "input": "", "output": "5"}
    assert created["first_rows"][1]["output"] == "red; or orange"
    shown = client.get(f"/v1/datasets/{created['id']}").json()
    assert shown["csv_delimiter"] == delimiter
    # The template's columns are all there: the job is accepted at submit.
    submitted = client.post("/v1/finetune/llm", json=make_payload(data_path=created["id"]))
    assert submitted.status_code == 201, submitted.text


def test_comma_csv_shows_a_comma_and_other_formats_no_delimiter(client: TestClient) -> None:
    comma = upload(client, separated(","), "plain.csv").json()
    jsonl = upload(client, b'{"instruction": "a", "input": "", "output": "b"}\n', "d.jsonl").json()

    assert (comma["csv_delimiter"], jsonl["csv_delimiter"]) == (",", None)
    listed = {d["id"]: d["csv_delimiter"] for d in client.get("/v1/datasets").json()["items"]}
    assert listed == {comma["id"]: ",", jsonl["id"]: None}


def test_csv_rows_split_differently_from_the_header_are_422_naming_line_and_delimiter(
    client: TestClient, tunery_env: Path
) -> None:
    data = b"instruction;output\nSay hi;Hello\nSay bye,Goodbye\n"

    response = upload(client, data, "mixed.csv")

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset"
    assert error["fields"][0]["path"] == "file"
    assert error["message"].startswith("mixed.csv line 3: the row has 1 field but the header")
    assert "semicolon (';')" in error["message"]
    assert not (tunery_env / "storage" / "datasets").exists()


def test_json_array_uploaded_as_jsonl_is_422_saying_it_is_an_array(
    client: TestClient, tunery_env: Path
) -> None:
    rows = [{"instruction": "a", "input": "", "output": "b"}] * 2

    response = upload(client, json.dumps(rows, indent=2).encode(), "train.jsonl")

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset"
    assert error["fields"][0]["path"] == "file"
    message = error["fields"][0]["message"]
    assert message.startswith("train.jsonl line 1: the file is a JSON array")
    assert "one JSON object per line" in message and "Rename it to .json" in message
    assert not (tunery_env / "storage" / "datasets").exists()
    renamed = upload(client, json.dumps(rows, indent=2).encode(), "train.json")
    assert renamed.status_code == 201, renamed.text
