"""Filtering the job list (`GET /v1/finetune/llm`, `GET /v1/deploy/list`) by status and base
model, and what the list routes answer to a query parameter they do not know."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.models import JobStatus
from shared.tenancy import ALL_TENANTS
from tests.api.conftest import new_key
from tests.api.test_finetune_routes import submit
from tests.conftest import make_payload

LIST_ROUTES = ("/v1/finetune/llm", "/v1/deploy/list")


def _jobs_in_every_status(client: TestClient) -> dict[JobStatus, str]:
    """One job per status, submitted in the order QUEUED, RUNNING, PAUSED, COMPLETED, FAILED,
    CANCELLED."""
    ids = {status: submit(client)["job_id"] for status in JobStatus}
    with session_scope() as session:
        for status in (JobStatus.RUNNING, JobStatus.COMPLETED, JobStatus.FAILED):
            claim = jobs.claim_job(session, ids[status], "test-worker", 60)
            assert claim is not None
            if status is not JobStatus.RUNNING:
                assert jobs.transition(session, claim.job_id, status, attempt=claim.attempt)
        jobs.request_pause(session, ALL_TENANTS, ids[JobStatus.PAUSED])
        jobs.request_cancel(session, ALL_TENANTS, ids[JobStatus.CANCELLED])
    return ids


def _listed(client: TestClient, path: str, **params: object) -> tuple[list[str], int]:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    return [item["job_id"] for item in body["items"]], body["total"]


@pytest.mark.parametrize("path", LIST_ROUTES)
def test_list_keeps_only_the_statuses_asked_for_and_counts_only_those(
    client: TestClient, path: str
) -> None:
    ids = _jobs_in_every_status(client)
    assert _listed(client, path, status="FAILED") == ([ids[JobStatus.FAILED]], 1)
    either = _listed(client, path, status=["FAILED", "CANCELLED"])
    assert either == ([ids[JobStatus.CANCELLED], ids[JobStatus.FAILED]], 2)
    assert _listed(client, path, status="COMPLETED", limit=1, offset=1) == ([], 1)
    assert _listed(client, path, status="PAUSED") == ([ids[JobStatus.PAUSED]], 1)
    assert _listed(client, path)[1] == 6


def test_status_names_are_ours_or_monsterapis_in_any_case(client: TestClient) -> None:
    ids = _jobs_in_every_status(client)
    for name, status in [("failed", JobStatus.FAILED), ("Running", JobStatus.RUNNING),
                         ("IN_QUEUE", JobStatus.QUEUED), ("in_progress", JobStatus.RUNNING),
                         ("TERMINATED", JobStatus.CANCELLED), ("completed", JobStatus.COMPLETED),
                         ("paused", JobStatus.PAUSED)]:
        assert _listed(client, "/v1/deploy/list", status=name) == ([ids[status]], 1), name


@pytest.mark.parametrize("path", LIST_ROUTES)
def test_an_unknown_status_is_a_422_naming_the_parameter_and_the_accepted_values(
    client: TestClient, path: str
) -> None:
    response = client.get(path, params={"status": ["FAILED", "DONE"]})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    [field] = error["fields"]
    assert field["path"] == "status"
    assert "'DONE'" in field["message"]
    for accepted in ("QUEUED", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELLED",
                     "IN_QUEUE", "IN_PROGRESS", "TERMINATED"):
        assert accepted in field["message"]


@pytest.mark.parametrize("path", LIST_ROUTES)
def test_an_unknown_query_parameter_is_a_422_not_an_unfiltered_list(
    client: TestClient, path: str
) -> None:
    submit(client)
    response = client.get(path, params={"state": "FAILED"})
    assert response.status_code == 422
    [field] = response.json()["error"]["fields"]
    assert field["path"] == "state"


def test_list_keeps_only_the_base_model_asked_for(client: TestClient) -> None:
    smollm = submit(client)["job_id"]
    gpt2 = submit(client, make_payload(model_path="gpt2"))["job_id"]
    assert _listed(client, "/v1/finetune/llm", base_model="gpt2") == ([gpt2], 1)
    smollm_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _listed(client, "/v1/deploy/list", base_model=smollm_name) == ([smollm], 1)
    assert _listed(client, "/v1/finetune/llm", base_model="gpt") == ([], 0)


def test_a_status_filter_stays_within_the_callers_tenant(client: TestClient) -> None:
    submit(client)
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    listed = client.get("/v1/finetune/llm", params={"status": "QUEUED"}, headers=other).json()
    assert listed["total"] == 0 and listed["items"] == []
