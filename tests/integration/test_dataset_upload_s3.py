"""Datasets on S3 storage: MonsterAPI's upload flow with a real presigned PUT over HTTP, checked
the first time the dataset is referenced, then read back by the worker's loader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from shared.settings import get_settings
from shared.storage import S3Storage
from tests.api.conftest import new_key
from tests.conftest import make_payload

ROWS = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(6)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


@pytest.fixture
def s3_client(
    tunery_env: Path,
    s3_storage: S3Storage,
    s3_endpoint_url: str,
    s3_credentials: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[TestClient]:
    monkeypatch.setenv("TUNERY_STORAGE_URL", f"s3://{s3_storage.bucket}/store-root")
    monkeypatch.setenv("TUNERY_S3_ENDPOINT_URL", s3_endpoint_url)
    monkeypatch.setenv("TUNERY_S3_ACCESS_KEY_ID", s3_credentials["access_key_id"])
    monkeypatch.setenv("TUNERY_S3_SECRET_ACCESS_KEY", s3_credentials["secret_access_key"])
    get_settings.cache_clear()
    from api.main import create_app

    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {new_key('tenant-a')}"
        yield client


def presigned_put(client: TestClient, data: bytes, filename: str = "mine.jsonl") -> dict:
    urls = client.get("/v1/upload", params={"filename": filename})
    assert urls.status_code == 200, urls.text
    body: dict = urls.json()
    response = httpx.put(body["upload_url"], content=data)
    assert response.status_code == 200, response.text
    return body


def test_presigned_put_goes_to_the_bucket_and_is_checked_when_first_referenced(
    s3_client: TestClient, s3_storage: S3Storage, s3_endpoint_url: str, tmp_path: Path
) -> None:
    urls = presigned_put(s3_client, JSONL)
    dataset_id = urls["download_url"]
    assert urls["upload_url"].startswith(f"{s3_endpoint_url}/{s3_storage.bucket}/")
    assert [o.key for o in s3_storage.list(f"uploads/{dataset_id}/")] == [
        f"uploads/{dataset_id}/mine.jsonl"
    ]

    meta = s3_client.get(f"/v1/datasets/{dataset_id}").json()

    assert meta["status"] == "ready" and meta["rows"] == len(ROWS) and meta["format"] == "jsonl"
    assert meta["first_rows"] == ROWS[:5]
    assert s3_storage.list(f"uploads/{dataset_id}/") == []
    assert s3_storage.exists(f"datasets/{dataset_id}/mine.jsonl")
    payload = make_payload(data_path=dataset_id,
                           data_config={"data_source_type": "s3_presigned_link"})
    assert s3_client.post("/v1/finetune/llm", json=payload).status_code == 201

    from worker.pipeline.data_source import load_dataset

    loaded = load_dataset(dataset_id, allowed_local_dirs=[], download_dir=tmp_path,
                          source_type="s3_presigned_link", storage=s3_storage)
    assert [dict(r) for r in loaded.rows] == ROWS


def test_submit_is_the_first_reference_too_and_a_bad_file_is_422_with_its_line(
    s3_client: TestClient, s3_storage: S3Storage
) -> None:
    dataset_id = presigned_put(s3_client, b'{"instruction": "a"}\n{broken\n')["dataset_id"]

    response = s3_client.post("/v1/finetune/llm", json=make_payload(data_path=dataset_id))

    assert response.status_code == 422
    field = response.json()["error"]["fields"][0]
    assert field["path"] == "data_config.data_path"
    assert "mine.jsonl line 2" in field["message"]
    meta = s3_client.get(f"/v1/datasets/{dataset_id}").json()
    assert meta["status"] == "failed" and "line 2" in meta["error"]
    assert s3_storage.list(f"uploads/{dataset_id}/") == []
    assert s3_storage.list(f"datasets/{dataset_id}/") == []


def test_presigned_put_over_the_limit_is_refused_when_referenced(
    s3_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset_id = presigned_put(s3_client, JSONL)["dataset_id"]
    monkeypatch.setenv("TUNERY_MAX_DATASET_BYTES", str(len(JSONL) - 1))
    get_settings.cache_clear()

    preview = s3_client.post(f"/v1/datasets/{dataset_id}/preview",
                             json={"prompt_template": "{output}"})

    assert preview.status_code == 413
    assert s3_client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "failed"


def test_presigned_put_beyond_the_tenants_quota_is_refused_when_referenced(
    s3_client: TestClient, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset_id = presigned_put(s3_client, JSONL)["dataset_id"]
    monkeypatch.setenv("TUNERY_MAX_TENANT_DATASET_BYTES", str(len(JSONL) - 1))
    get_settings.cache_clear()

    preview = s3_client.post(f"/v1/datasets/{dataset_id}/preview",
                             json={"prompt_template": "{output}"})

    assert preview.status_code == 413
    assert "TUNERY_MAX_TENANT_DATASET_BYTES" in preview.json()["error"]["message"]
    assert s3_client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "failed"
    assert s3_storage.list(f"uploads/{dataset_id}/") == []


def test_delete_removes_the_dataset_from_the_bucket(
    s3_client: TestClient, s3_storage: S3Storage
) -> None:
    dataset_id = s3_client.post("/v1/datasets", files={"file": ("t.jsonl", JSONL)}).json()["id"]
    assert s3_storage.list(f"datasets/{dataset_id}/") != []

    assert s3_client.delete(f"/v1/datasets/{dataset_id}").status_code == 204

    assert s3_storage.list(f"datasets/{dataset_id}/") == []


def test_post_datasets_stores_the_checked_file_in_the_bucket(
    s3_client: TestClient, s3_storage: S3Storage
) -> None:
    response = s3_client.post("/v1/datasets", files={"file": ("train.jsonl", JSONL)})

    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    assert s3_storage.list(f"datasets/{dataset_id}/")[0].size == len(JSONL)
