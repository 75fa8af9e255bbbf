"""Loading a dataset: local files and directories, URLs, uploaded and hub datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.dataset_files import LoadedDataset
from worker.pipeline.data_source import load_dataset
from worker.pipeline.errors import PipelineError

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "Answer: 5."},
    {"instruction": "Name a colour.", "input": "", "output": "Answer: red."},
]


def _load(path: Path | str, allowed: Path, **kwargs: Any) -> LoadedDataset:
    return load_dataset(
        str(path), allowed_local_dirs=[allowed], download_dir=allowed / "dl", **kwargs
    )


def test_unparseable_jsonl_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + '\n{"instruction": "x",\n')

    with pytest.raises(PipelineError, match=r"train\.jsonl line 4: invalid JSON"):
        _load(path, tmp_path)


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")

    with pytest.raises(PipelineError, match="line 2: expected a JSON object"):
        _load(path, tmp_path)


def test_csv_row_with_wrong_field_count_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("instruction,input,output\na,b,c\nd,e\n")

    with pytest.raises(PipelineError, match=r"train\.csv line 3"):
        _load(path, tmp_path)


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        lines = [",".join(rows[0])] + [",".join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow
        import pyarrow.parquet as pq

        pq.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet"])
def test_each_local_format_loads_rows_and_columns(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, ROWS)

    dataset = _load(path, tmp_path)

    assert dataset.columns == ["instruction", "input", "output"]
    assert [dict(r) for r in dataset.rows] == ROWS


def test_json_lines_in_a_dot_json_file_load(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    assert len(_load(path, tmp_path).rows) == 2


def test_a_directory_loads_all_its_data_files_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    _write(folder / "b.csv", ROWS[1:])
    _write(folder / "a.jsonl", ROWS[:1])
    (folder / "notes.txt").write_text("not data")

    dataset = _load(folder, tmp_path)

    assert [dict(r) for r in dataset.rows] == ROWS


def test_local_file_outside_allowed_dirs_is_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    path = _write(tmp_path / "d.jsonl", ROWS)

    with pytest.raises(PipelineError, match="outside the directories"):
        _load(path, allowed)


def test_missing_local_file_is_a_pipeline_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        _load(tmp_path / "nope.jsonl", tmp_path)


def _client(handler: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_url_download_reads_format_from_file_name(tmp_path: Path) -> None:
    body = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=body, headers={"content-type": "binary/octet-stream"})

    url = "https://bucket.example.com/data/train.jsonl?X-Amz-Signature=secret"
    dataset = _load(url, tmp_path, source_type="s3_presigned_link", client=_client(handler))

    assert seen == [url]
    assert [dict(r) for r in dataset.rows] == ROWS
    assert "secret" not in dataset.origin
    assert (tmp_path / "dl" / "dataset.jsonl").is_file()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/csv; charset=utf-8", b"instruction,input,output\na,b,c\n"),
        ("application/octet-stream", b'[{"instruction": "a", "input": "b", "output": "c"}]'),
    ],
)
def test_url_without_extension_uses_content_type_then_content(
    tmp_path: Path, content_type: str, body: bytes
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    dataset = _load("https://x.example.com/download?id=3", tmp_path, client=_client(handler))

    assert [dict(r) for r in dataset.rows] == [{"instruction": "a", "input": "b", "output": "c"}]


def test_expired_presigned_url_error_hides_the_signature(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, content=b"Request has expired")

    url = "https://bucket.example.com/train.jsonl?X-Amz-Signature=secret"
    with pytest.raises(PipelineError) as info:
        _load(url, tmp_path, client=_client(handler))

    assert "HTTP 403" in str(info.value) and "expired" in str(info.value)
    assert "secret" not in str(info.value)


def test_presigned_source_type_needs_a_url(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", ROWS)

    with pytest.raises(PipelineError, match="needs an https URL"):
        _load(path, tmp_path, source_type="s3_presigned_link")


def test_unreachable_hub_dataset_is_a_clear_pipeline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match="could not load hub dataset tatsu-lab/alpaca"):
        load_dataset("tatsu-lab/alpaca", allowed_local_dirs=[], download_dir=tmp_path)


def test_hub_id_that_names_a_local_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # datasets.load_dataset("data/set") would read ./data/set: a way around allowed_local_dirs.
    (tmp_path / "data" / "set").mkdir(parents=True)
    _write(tmp_path / "data" / "set" / "x.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match="also a path on the worker"):
        load_dataset("data/set", allowed_local_dirs=[], download_dir=tmp_path / "dl")


@pytest.mark.parametrize("name", ["text", "json", "csv"])
def test_a_bare_dataset_name_is_refused_by_the_worker_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A stored payload skips the API's check. datasets.load_dataset("text") is a packaged
    # builder that would read every text file under the current directory.
    _write(tmp_path / "secret.txt", ROWS)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(PipelineError, match="hub datasets are named 'owner/name'"):
        load_dataset(name, allowed_local_dirs=[], download_dir=tmp_path / "dl")
