"""Deleting a job (`DELETE /v1/finetune/llm/{id}`): its rows and every object under its
prefixes go, nothing of another job's; what a delete refuses while something still uses the
job; and datasets refused while an active job trains on them."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from shared import exports, jobs
from shared.db import session_scope
from shared.models import (
    Deployment,
    IdempotencyKey,
    Job,
    JobEvent,
    JobExport,
    JobLog,
    JobMetric,
    JobStatus,
)
from shared.schema import ExportRequest
from shared.settings import get_settings
from shared.storage import Storage, storage_from_settings
from shared.storage_keys import job_prefixes
from shared.tenancy import ALL_TENANTS
from tests.api.conftest import new_key
from tests.api.test_datasets import upload_ok
from tests.api.test_deployments import client_payload
from tests.api.test_finetune_routes import submit
from tests.api.test_openai_dialect import chat_lines, create, upload
from tests.conftest import make_payload

CHILD_TABLES = (JobEvent, JobLog, JobMetric, JobExport, Deployment, IdempotencyKey)


def job_files(job_id: str) -> dict[str, bytes]:
    """What a job leaves in storage: adapter, an export, checkpoints in both layouts."""
    return {
        f"jobs/{job_id}/adapter_model.safetensors": b"weights-" + job_id.encode(),
        f"jobs/{job_id}/adapter_config.json": b"{}",
        f"jobs/{job_id}/exports/gguf-f16/model.gguf": b"gguf",
        f"jobs/{job_id}/checkpoints/step-3/adapter_model.safetensors": b"legacy",
        f"checkpoints/{job_id}/step-6/adapter_model.safetensors": b"ckpt",
        f"checkpoints/{job_id}/step-6/complete.json": b"{}",
    }


def job_with_everything(client: httpx.Client, status: JobStatus = JobStatus.COMPLETED) -> str:
    """A job in `status` with files in storage, logs, metrics, an export and an idempotency
    key: one of each row a job can own."""
    response = client.post("/v1/finetune/llm", json=make_payload(),
                           headers={"Idempotency-Key": uuid.uuid4().hex})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    storage = storage_from_settings(get_settings())
    for key, data in job_files(job_id).items():
        storage.put_bytes(key, data)
    if status is JobStatus.QUEUED:
        return job_id
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        jobs.append_log(session, job_id, claim.attempt, "a log line")
        jobs.record_metric(session, job_id, claim.attempt, 1, {"loss": 1.5})
        if status is not JobStatus.RUNNING:
            assert jobs.transition(session, job_id, status, attempt=claim.attempt)
        if status is JobStatus.COMPLETED:
            exports.request_export(session, ALL_TENANTS, job_id, ExportRequest(format="gguf"))
    return job_id


def rows_of(job_id: str) -> dict[str, int]:
    with session_scope() as session:
        counts = {table.__tablename__: session.scalar(
            select(func.count()).select_from(table).where(table.job_id == job_id))
            for table in CHILD_TABLES}
        counts["jobs"] = session.scalar(select(func.count()).select_from(Job)
                                        .where(Job.id == job_id))
    return counts


def objects_of(storage: Storage, job_id: str) -> list[str]:
    return [obj.key for prefix in job_prefixes(job_id) for obj in storage.list(prefix)]


def test_delete_removes_every_row_and_object_of_the_job_and_nothing_of_another(
        client: TestClient) -> None:
    storage = storage_from_settings(get_settings())
    job_id, neighbour = job_with_everything(client), job_with_everything(client)
    deployed = client.post("/v1/deploy/llm", json=client_payload(job_id))
    assert deployed.status_code == 201, deployed.text
    client.post("/v1/deploy/terminate", json={"deployment_id": deployed.json()["deployment_id"]})
    before = rows_of(job_id)
    assert all(before.values()), before  # every kind of row is there to be deleted
    assert len(objects_of(storage, job_id)) == len(job_files(job_id))

    response = client.delete(f"/v1/finetune/llm/{job_id}")

    assert response.status_code == 204, response.text
    assert rows_of(job_id) == dict.fromkeys(before, 0)
    assert objects_of(storage, job_id) == []
    assert client.get(f"/v1/finetune/llm/{job_id}").status_code == 404
    assert client.delete(f"/v1/finetune/llm/{job_id}").status_code == 404
    assert sorted(objects_of(storage, neighbour)) == sorted(job_files(neighbour))
    assert all(rows_of(neighbour)[table] for table in ("jobs", "job_events", "job_logs"))
    assert client.get(f"/v1/finetune/llm/{neighbour}/artifacts").json()["artifacts"]


def test_another_tenants_delete_is_a_404_exactly_like_an_unknown_id(client: TestClient) -> None:
    job_id = job_with_everything(client)
    unknown = "0b0e7f3c-2d1a-4c5e-9f00-000000000000"
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}

    theirs = client.delete(f"/v1/finetune/llm/{job_id}", headers=other)
    missing = client.delete(f"/v1/finetune/llm/{unknown}", headers=other)

    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == {"error": {**missing.json()["error"], "message": missing.json()[
        "error"]["message"].replace(unknown, job_id)}}
    assert rows_of(job_id)["jobs"] == 1
    assert len(objects_of(storage_from_settings(get_settings()), job_id)) == 6


def test_a_queued_or_paused_job_is_cancelled_then_deleted(client: TestClient) -> None:
    storage = storage_from_settings(get_settings())
    queued = job_with_everything(client, JobStatus.QUEUED)
    paused = job_with_everything(client, JobStatus.QUEUED)
    client.post(f"/v1/finetune/llm/{paused}/pause")
    assert client.get(f"/v1/finetune/llm/{paused}").json()["status"] == "PAUSED"

    for job_id in (queued, paused):
        assert client.delete(f"/v1/finetune/llm/{job_id}").status_code == 204
        assert rows_of(job_id)["jobs"] == 0
        assert objects_of(storage, job_id) == []
        # A wake-up still in the broker claims nothing.
        with session_scope() as session:
            assert jobs.claim_job(session, job_id, "late-worker", 60) is None


def test_a_running_job_is_refused_with_409_until_cancelled_and_keeps_everything(
        client: TestClient) -> None:
    storage = storage_from_settings(get_settings())
    job_id = job_with_everything(client, JobStatus.RUNNING)

    refused = client.delete(f"/v1/finetune/llm/{job_id}")

    assert refused.status_code == 409
    assert "cancel it first" in refused.json()["error"]["message"]
    assert rows_of(job_id)["jobs"] == 1 and len(objects_of(storage, job_id)) == 6
    job = client.get(f"/v1/finetune/llm/{job_id}").json()
    assert job["status"] == "RUNNING"
    # The worker sees the cancel at its next heartbeat and records CANCELLED.
    client.post(f"/v1/finetune/llm/{job_id}/cancel")
    with session_scope() as session:
        attempt = session.get(Job, job_id).attempt  # type: ignore[union-attr]
        assert jobs.transition(session, job_id, JobStatus.CANCELLED, attempt=attempt)
    assert client.delete(f"/v1/finetune/llm/{job_id}").status_code == 204
    assert objects_of(storage, job_id) == []


def test_a_live_deployment_blocks_the_delete_until_it_is_terminated(client: TestClient) -> None:
    job_id = job_with_everything(client)
    deployment_id = client.post("/v1/deploy/llm", json=client_payload(job_id)).json()[
        "deployment_id"]

    refused = client.delete(f"/v1/finetune/llm/{job_id}")

    assert refused.status_code == 409
    assert deployment_id in refused.json()["error"]["message"]
    assert rows_of(job_id)["jobs"] == 1
    client.post("/v1/deploy/terminate", json={"deployment_id": deployment_id})
    assert client.delete(f"/v1/finetune/llm/{job_id}").status_code == 204
    assert client.get(f"/v1/deploy/status/{deployment_id}").status_code == 404


def test_an_export_being_built_blocks_the_delete(client: TestClient) -> None:
    job_id = job_with_everything(client)
    with session_scope() as session:
        export_id = session.scalar(select(JobExport.id).where(JobExport.job_id == job_id))
        assert export_id is not None
        assert exports.claim_export(session, export_id, "w", 600) is not None

    refused = client.delete(f"/v1/finetune/llm/{job_id}")

    assert refused.status_code == 409
    assert export_id in refused.json()["error"]["message"]
    assert rows_of(job_id)["jobs"] == 1


def test_a_dataset_in_use_refuses_delete_naming_the_jobs_then_deletes_with_its_file(
        client: TestClient, tunery_env: Path) -> None:
    dataset_id = upload_ok(client)["id"]
    stored = list((tunery_env / "storage" / "datasets" / dataset_id).iterdir())
    assert stored
    payload = make_payload(data_path=dataset_id,
                           data_config={"data_source_type": "s3_presigned_link"})
    job_id = submit(client, payload)["job_id"]

    refused = client.delete(f"/v1/datasets/{dataset_id}")

    assert refused.status_code == 409
    assert job_id in refused.json()["error"]["message"]
    client.post(f"/v1/finetune/llm/{job_id}/cancel")
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert not (tunery_env / "storage" / "datasets" / dataset_id).exists()
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404


def test_a_training_file_in_use_refuses_delete_naming_the_jobs_then_deletes_with_its_file(
        client: TestClient, tunery_env: Path) -> None:
    file_id = upload(client, chat_lines(12)).json()["id"]
    job = create(client, file_id).json()
    paused = create(client, file_id).json()
    client.post(f"/v1/fine_tuning/jobs/{paused['id']}/pause")
    storage = storage_from_settings(get_settings())
    dataset_keys = [o.key for o in storage.list("datasets/")]
    assert dataset_keys

    refused = client.delete(f"/v1/files/{file_id}")

    # The OpenAI dialect says 400 for a conflict: OpenAI's SDK would retry a 409.
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    job_ids = [j["id"].removeprefix("ftjob-") for j in (job, paused)]
    assert all(job_id in message for job_id in job_ids), message
    for job_id in job_ids:
        client.post(f"/v1/finetune/llm/{job_id}/cancel")
    deleted = client.delete(f"/v1/files/{file_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert [o.key for o in storage.list("datasets/")] == []
