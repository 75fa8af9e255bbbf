"""A job's warnings shown with it: in the job and in the list, an empty list when it has none."""

from __future__ import annotations

from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from tests.conftest import make_payload

WARNING = "warm-up capped from 50 to 1 steps: ..."


def test_a_job_shows_its_warnings_and_an_empty_list_without(client: TestClient) -> None:
    job_id = client.post("/v1/finetune/llm", json=make_payload()).json()["job_id"]
    assert client.get(f"/v1/finetune/llm/{job_id}").json()["warnings"] == []

    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "worker", 60)
        assert claim is not None
        assert jobs.add_warning(session, claim, WARNING)

    assert client.get(f"/v1/finetune/llm/{job_id}").json()["warnings"] == [WARNING]
    (listed,) = client.get("/v1/finetune/llm").json()["items"]
    assert listed["warnings"] == [WARNING]
