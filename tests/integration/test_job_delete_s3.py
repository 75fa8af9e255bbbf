"""A job deleted on S3 storage (moto's server over HTTP): no object under its prefixes is left
in the bucket, and another job's objects stay."""

from __future__ import annotations

from fastapi.testclient import TestClient

from shared.storage import S3Storage
from tests.api.test_job_delete import job_files, job_with_everything, objects_of, rows_of
from tests.integration.test_dataset_upload_s3 import (  # noqa: F401 - s3_client is a fixture
    s3_client,
)


def test_a_deleted_job_leaves_no_object_under_its_prefixes_in_the_bucket(
    s3_client: TestClient, s3_storage: S3Storage  # noqa: F811
) -> None:
    job_id, neighbour = job_with_everything(s3_client), job_with_everything(s3_client)
    assert sorted(objects_of(s3_storage, job_id)) == sorted(job_files(job_id))

    response = s3_client.delete(f"/v1/finetune/llm/{job_id}")

    assert response.status_code == 204, response.text
    assert objects_of(s3_storage, job_id) == []
    # Listed from the bucket itself, the store's key prefix included.
    left = s3_storage._client.list_objects_v2(Bucket=s3_storage.bucket).get("Contents", [])
    assert [o["Key"] for o in left if job_id in o["Key"]] == []
    assert rows_of(job_id)["jobs"] == 0
    assert sorted(objects_of(s3_storage, neighbour)) == sorted(job_files(neighbour))
