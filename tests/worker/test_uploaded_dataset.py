"""The worker reads a dataset uploaded to Tunery by its id, from storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.dataset_files import DatasetFileError, read_file
from shared.storage import LocalStorage
from shared.storage_keys import dataset_key
from worker.pipeline.data_source import load_dataset
from worker.pipeline.errors import PipelineError
from worker.pipeline.examples import render_examples

DATASET_ID = "ds_" + "1" * 32
ROWS = [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": "6"}]


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def test_load_dataset_downloads_an_uploaded_dataset_by_id(
    storage: LocalStorage, tmp_path: Path
) -> None:
    storage.put_bytes(
        dataset_key(DATASET_ID, "mine.jsonl"), "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    )
    lines: list[str] = []

    dataset = load_dataset(
        DATASET_ID, allowed_local_dirs=[], download_dir=tmp_path / "work", storage=storage,
        source_type="s3_presigned_link", log=lines.append,
    )

    assert dataset.columns == ["q", "a"]
    assert [dict(r) for r in dataset.rows] == ROWS
    assert dataset.origin == DATASET_ID
    assert (tmp_path / "work" / "mine.jsonl").is_file()
    assert render_examples(dataset, "Q: {q} A: {a}")[0].completion == "4"
    assert any(DATASET_ID in line for line in lines)


def test_unknown_dataset_id_is_a_pipeline_error_saying_so(
    storage: LocalStorage, tmp_path: Path
) -> None:
    with pytest.raises(PipelineError, match="has no file in storage"):
        load_dataset(DATASET_ID, allowed_local_dirs=[], download_dir=tmp_path, storage=storage)


def test_dataset_id_without_storage_is_a_pipeline_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no storage"):
        load_dataset(DATASET_ID, allowed_local_dirs=[], download_dir=tmp_path)


def test_worker_readers_and_api_readers_are_the_same_code(tmp_path: Path) -> None:
    # The API validates uploads with shared.dataset_files; the worker must parse identically.
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\nnot json\n')

    with pytest.raises(DatasetFileError) as shared_error:
        read_file(path)
    with pytest.raises(PipelineError) as worker_error:
        load_dataset(str(path), allowed_local_dirs=[tmp_path], download_dir=tmp_path / "dl")

    assert str(worker_error.value) == str(shared_error.value)
    assert "bad.jsonl line 2" in str(shared_error.value)
