"""The /v1/deploy aliases the official monsterapi client calls."""

from __future__ import annotations

from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from tests.api.test_finetune_routes import submit


def test_status_logs_list_and_terminate_alias_the_job_routes(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        jobs.append_log(session, job_id, claim.attempt, "hello")
    status = client.get(f"/v1/deploy/status/{job_id}").json()
    assert status == client.get(f"/v1/finetune/llm/{job_id}").json()
    assert client.get(f"/v1/deploy/logs/{job_id}", params={"n_lines": 5}).json()["logs"] == [
        "hello"
    ]
    assert [j["job_id"] for j in client.get("/v1/deploy/list").json()["items"]] == [job_id]
    terminated = client.post(
        "/v1/deploy/terminate", json={"deployment_id": job_id, "actor": "user"}
    )
    assert terminated.status_code == 200
    assert terminated.json()["cancel_requested"] is True


def test_terminate_unknown_deployment_is_404_and_bad_body_422(client: TestClient) -> None:
    missing = client.post("/v1/deploy/terminate", json={"deployment_id": "nope", "actor": "user"})
    assert missing.status_code == 404
    bad = client.post("/v1/deploy/terminate", json={"id": "x"})
    assert bad.status_code == 422
    paths = {f["path"] for f in bad.json()["error"]["fields"]}
    assert paths == {"deployment_id", "id"}
