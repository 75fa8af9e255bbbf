"""Submit-time checks of pretrainedmodel_config.resume_checkpoint_path: only the caller's own
earlier jobs, in a state that has what the path names, on the same base model and LoRA shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.models import JobStatus
from shared.settings import get_settings
from shared.storage import storage_from_settings
from shared.storage_keys import CHECKPOINT_MARKER
from tests.api.conftest import new_key
from tests.conftest import make_payload

FIELD = "pretrainedmodel_config.resume_checkpoint_path"


def submit(client: TestClient, resume: str = "", **model: Any) -> Any:
    payload = make_payload(pretrainedmodel_config={"resume_checkpoint_path": resume, **model})
    return client.post("/v1/finetune/llm", json=payload)


def earlier_job(client: TestClient, *, completed: bool) -> str:
    response = submit(client)
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    if completed:
        with session_scope() as session:
            claim = jobs.claim_job(session, job_id, "test-worker", 60)
            assert claim is not None
            assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)
    return job_id


def refusal(response: Any) -> str:
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["fields"]
    assert [f["path"] for f in fields] == [FIELD]
    return str(fields[0]["message"])


def test_completed_jobs_final_adapter_or_id_is_accepted(client: TestClient) -> None:
    job_id = earlier_job(client, completed=True)

    assert submit(client, f"jobs/{job_id}").status_code == 201
    assert submit(client, job_id).status_code == 201


def store_checkpoint(job_id: str, step: int, *, complete: bool = True) -> None:
    """A checkpoint in storage as the worker leaves it: its files, then its marker."""
    storage = storage_from_settings(get_settings())
    prefix = f"checkpoints/{job_id}/step-{step}/"
    storage.put_bytes(prefix + "adapter_model.safetensors", b"weights")
    if complete:
        marker = {"step": step, "files": {"adapter_model.safetensors": 7}}
        storage.put_bytes(prefix + CHECKPOINT_MARKER, json.dumps(marker).encode())


def test_unfinished_jobs_checkpoint_or_id_is_accepted(client: TestClient) -> None:
    job_id = earlier_job(client, completed=False)
    store_checkpoint(job_id, 50)

    assert submit(client, f"jobs/{job_id}/checkpoints/step-50").status_code == 201
    assert submit(client, job_id).status_code == 201


def test_a_job_cancelled_before_its_first_checkpoint_is_refused(client: TestClient) -> None:
    job_id = earlier_job(client, completed=False)
    assert client.post(f"/v1/finetune/llm/{job_id}/cancel").status_code == 200
    store_checkpoint(job_id, 50, complete=False)  # cut off mid-upload: not resumable

    assert refusal(submit(client, job_id)) == (
        f"job {job_id} is CANCELLED and has no checkpoint to continue from")
    assert "no checkpoint" in refusal(submit(client, f"jobs/{job_id}/checkpoints/step-50"))
    # Its final adapter's path: no hint at an id or a checkpoint that would be refused too.
    assert refusal(submit(client, f"jobs/{job_id}")) == (
        f"job {job_id} is CANCELLED, so it has no final adapter and no checkpoint to continue "
        "from")


def test_a_queued_job_without_checkpoints_is_refused_until_it_writes_one(
    client: TestClient,
) -> None:
    job_id = earlier_job(client, completed=False)

    assert "wait for its first checkpoint" in refusal(submit(client, job_id))


def test_a_checkpoint_step_that_is_not_stored_is_refused_naming_the_stored_ones(
    client: TestClient,
) -> None:
    job_id = earlier_job(client, completed=False)
    store_checkpoint(job_id, 50)
    store_checkpoint(job_id, 100)

    message = refusal(submit(client, f"jobs/{job_id}/checkpoints/step-75"))

    assert f"job {job_id} has no checkpoint at step 75" in message
    assert "[50, 100]" in message


def test_unknown_job_is_a_422_naming_the_field(client: TestClient) -> None:
    message = refusal(submit(client, "jobs/00000000-0000-0000-0000-000000000000"))
    assert "no job with id 00000000-0000-0000-0000-000000000000" in message


def test_another_tenants_job_is_refused_like_a_missing_one(client: TestClient) -> None:
    job_id = earlier_job(client, completed=True)
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    payload = make_payload(pretrainedmodel_config={"resume_checkpoint_path": f"jobs/{job_id}"})

    response = client.post("/v1/finetune/llm", json=payload, headers=other)

    assert refusal(response) == f"no job with id {job_id}"


def test_final_adapter_of_an_unfinished_job_is_refused(client: TestClient) -> None:
    job_id = earlier_job(client, completed=False)
    assert "has no final adapter" in refusal(submit(client, f"jobs/{job_id}"))


def test_checkpoint_of_a_completed_job_is_refused_with_the_path_to_use(
    client: TestClient,
) -> None:
    job_id = earlier_job(client, completed=True)
    message = refusal(submit(client, f"jobs/{job_id}/checkpoints/step-50"))
    assert f"use 'jobs/{job_id}'" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model_path": "HuggingFaceTB/SmolLM2-360M-Instruct"}, "its own base model"),
        ({"lora_r": 16}, "used lora_r=8, this request lora_r=16"),
        ({"lora_alpha": 32}, "used lora_alpha=16"),
    ],
)
def test_adapter_for_another_base_model_or_lora_shape_is_refused(
    client: TestClient, change: dict[str, Any], expected: str
) -> None:
    job_id = earlier_job(client, completed=True)
    assert expected in refusal(submit(client, f"jobs/{job_id}", **change))


def test_a_full_finetune_has_no_adapter_to_continue_from(client: TestClient) -> None:
    response = submit(client, use_lora=False)
    assert response.status_code == 201, response.text
    job_id = response.json()["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "test-worker", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)

    message = refusal(submit(client, f"jobs/{job_id}"))

    assert message == (f"job {job_id} trained the whole model (use_lora false): it has no "
                       "LoRA adapter to continue from")
