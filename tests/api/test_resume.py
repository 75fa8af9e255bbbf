"""Submit-time checks of pretrainedmodel_config.resume_checkpoint_path: only the caller's own
earlier jobs, in a state that has what the path names, on the same base model and LoRA shape."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.models import JobStatus
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


def test_unfinished_jobs_checkpoint_or_id_is_accepted(client: TestClient) -> None:
    job_id = earlier_job(client, completed=False)

    assert submit(client, f"jobs/{job_id}/checkpoints/step-50").status_code == 201
    assert submit(client, job_id).status_code == 201


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
