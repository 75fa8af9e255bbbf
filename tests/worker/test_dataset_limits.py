"""The worker's share of the operator limits: `max_dataset_rows` for URL, uploaded, local and
hub datasets, and compressed files refused instead of parsed as garbage."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared import dataset_files
from shared.dataset_files import LoadedDataset
from worker.pipeline.data_source import load_dataset
from worker.pipeline.errors import PipelineError

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


def load_url(body: bytes, tmp_path: Path, url: str, **kwargs: Any) -> LoadedDataset:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    return load_dataset(url, allowed_local_dirs=[tmp_path], download_dir=tmp_path / "dl",
                        client=client, **kwargs)


def test_a_url_dataset_over_max_rows_fails_naming_the_limit(tmp_path: Path) -> None:
    url = "https://data.example.com/train.jsonl"
    assert len(load_url(JSONL, tmp_path, url, max_rows=10).rows) == 10
    with pytest.raises(PipelineError, match=r"more than 9 rows.*TUNERY_MAX_DATASET_ROWS"):
        load_url(JSONL, tmp_path, url, max_rows=9)


def test_reading_stops_at_the_first_row_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(JSONL * 1000)
    parsed: list[str] = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda s, *a, **k: parsed.append(s) or real_loads(s))
    with pytest.raises(dataset_files.TooManyRows):
        dataset_files.read_file(path, max_rows=25)
    assert len(parsed) == 26


def test_a_local_directory_or_hub_dataset_over_max_rows_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_bytes(JSONL)
    with pytest.raises(PipelineError, match="has 20 rows, more than the 15"):
        load_dataset(str(tmp_path), allowed_local_dirs=[tmp_path],
                     download_dir=tmp_path / "dl", max_rows=15)

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(ROWS))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="has 10 rows, more than the 5"):
        load_dataset("org/some-dataset", allowed_local_dirs=[], download_dir=tmp_path / "dl",
                     max_rows=5)


@pytest.mark.parametrize("url", ["https://data.example.com/train.jsonl",
                                 "https://data.example.com/download?id=3"])
def test_a_compressed_url_dataset_is_refused_not_parsed(tmp_path: Path, url: str) -> None:
    with pytest.raises(PipelineError, match="gzip-compressed file; compressed datasets are not"):
        load_url(gzip.compress(JSONL), tmp_path, url)
