"""The full stack without Docker: API and worker processes on this machine's PostgreSQL and
Redis, with an S3-compatible HTTP endpoint (moto's server) for storage."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from cli.local_stack import LocalStack
from shared.storage import S3Storage
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import (
    assert_adapter_changes_the_model,
    assert_loss_went_down,
    create_key,
    download_artifacts,
    stack_env,
    tiny_payload,
    wait_for_terminal,
)


def test_job_runs_on_postgres_redis_and_s3_and_downloads_by_presigned_url(
    tmp_path: Path,
    tiny_model_dir: Path,
    start_stack: Callable[..., LocalStack],
    postgres_url: str,
    redis_url: str,
    s3_endpoint_url: str,
    s3_credentials: dict[str, str],
) -> None:
    bucket = f"tunery-e2e-{uuid.uuid4().hex[:8]}"
    S3Storage(bucket, endpoint_url=s3_endpoint_url, **s3_credentials).ensure_bucket()
    env = stack_env(
        tmp_path / "data",
        [ASSETS_DIR, tiny_model_dir],
        TUNERY_DATABASE_URL=postgres_url,
        TUNERY_BROKER_URL=redis_url,
        TUNERY_STORAGE_URL=f"s3://{bucket}/tunery",
        TUNERY_S3_ENDPOINT_URL=s3_endpoint_url,
        TUNERY_S3_ACCESS_KEY_ID=s3_credentials["access_key_id"],
        TUNERY_S3_SECRET_ACCESS_KEY=s3_credentials["secret_access_key"],
    )
    stack = start_stack(env)
    key = create_key(env)
    with httpx.Client(
        base_url=stack.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        assert client.get("/readyz").json()["checks"] == {
            "database": "ok",
            "broker": "ok",
            "storage": "ok",
        }
        job_id = client.post("/v1/finetune/llm", json=tiny_payload(tiny_model_dir)).json()["job_id"]
        job = wait_for_terminal(client, job_id)
        assert job["status"] == "COMPLETED", job
        listing = client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()["artifacts"]
        assert all(a["download_url"].startswith(s3_endpoint_url) for a in listing)
        download_artifacts(client, job_id, tmp_path / "adapter")
        assert_loss_went_down(client, job_id)
    stored = S3Storage(bucket, "tunery", endpoint_url=s3_endpoint_url, **s3_credentials)
    assert stored.exists(f"jobs/{job_id}/adapter_model.safetensors")
    assert_adapter_changes_the_model(tiny_model_dir, tmp_path / "adapter")
