"""A completed job's adapter in one tar.gz from S3 storage (moto's server over HTTP): the
archive route reads every object from the bucket as it streams."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

from shared.storage import S3Storage
from tests.api.test_artifact_archive import FILES, completed_job, unpacked
from tests.integration.test_dataset_upload_s3 import (  # noqa: F401 - s3_client is a fixture
    s3_client,
)


def test_completed_job_downloads_its_artifacts_from_s3_as_one_tar_gz(
    s3_client: TestClient, s3_storage: S3Storage  # noqa: F811
) -> None:
    job_id = completed_job(s3_client)
    assert sorted(o.key for o in s3_storage.list(f"jobs/{job_id}/")) == sorted(
        f"jobs/{job_id}/{name}" for name in FILES)

    listing = s3_client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()
    response = s3_client.get(listing["archive_url"])

    assert listing["archive_url"] == f"/v1/finetune/llm/{job_id}/artifacts/archive"
    assert response.status_code == 200, response.text
    assert {name: content for name, (content, _) in unpacked(response.content).items()} == {
        f"{job_id}-adapter/{name}": data for name, data in FILES.items()
    }
    # The files one by one still come from presigned URLs, as before.
    weights = next(a for a in listing["artifacts"] if a["name"] == "adapter_model.safetensors")
    assert httpx.get(weights["download_url"]).content == FILES["adapter_model.safetensors"]
