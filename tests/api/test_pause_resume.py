"""`POST /v1/finetune/llm/{id}/pause` and `/resume` (Tunery extensions) against a real app,
SQLite database and SQLite broker: a queued job pauses at once, a running one is asked, a
resume queues the job again and wakes a worker, a finished job answers 409, a paused job is
cancelled at once and keeps its place under the active jobs cap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.queue import get_celery
from tests.api.conftest import new_key
from tests.api.test_finetune_routes import submit
from tests.conftest import make_payload

URL = "/v1/finetune/llm"


def waiting_wake_ups() -> list[str]:
    """The job ids of the wake-ups waiting in the broker, taken out of it."""
    ids = []
    with get_celery().connection_for_read() as conn:
        queue = conn.SimpleQueue("train", no_ack=True)
        while queue.qsize():
            ids.append(queue.get(timeout=5).headers["argsrepr"])
        queue.close()
    return ids


def post(client: TestClient, job_id: str, action: str, status_code: int = 200) -> dict:
    response = client.post(f"{URL}/{job_id}/{action}")
    assert response.status_code == status_code, response.text
    return dict(response.json())


def test_a_queued_job_pauses_at_once_and_a_resume_queues_it_and_wakes_a_worker(
    client: TestClient,
) -> None:
    job_id = submit(client)["job_id"]
    waiting_wake_ups()  # the submit's

    paused = post(client, job_id, "pause")
    assert (paused["status"], paused["monsterapi_status"]) == ("PAUSED", "PAUSED")
    assert paused["pause_requested"] is False and paused["phase"] is None
    assert client.get(f"{URL}/{job_id}").json()["status"] == "PAUSED"
    assert post(client, job_id, "pause")["status"] == "PAUSED"  # again: nothing changes
    assert waiting_wake_ups() == []

    resumed = post(client, job_id, "resume")
    assert (resumed["status"], resumed["monsterapi_status"]) == ("QUEUED", "IN_QUEUE")
    assert waiting_wake_ups() == [repr([job_id])]


def test_a_running_job_is_asked_to_pause_and_a_resume_withdraws_the_request(
    client: TestClient,
) -> None:
    job_id = submit(client)["job_id"]
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "test-worker", 60) is not None
    waiting_wake_ups()

    asked = post(client, job_id, "pause")
    assert (asked["status"], asked["pause_requested"]) == ("RUNNING", True)

    withdrawn = post(client, job_id, "resume")
    assert (withdrawn["status"], withdrawn["pause_requested"]) == ("RUNNING", False)
    assert waiting_wake_ups() == []  # it runs: nobody needs waking


def test_a_finished_job_can_neither_pause_nor_resume(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    post(client, job_id, "cancel")

    for action in ("pause", "resume"):
        error = post(client, job_id, action, 409)["error"]
        assert error["code"] == "conflict"
        assert error["message"] == (f"job {job_id} is already CANCELLED; a finished job "
                                    f"cannot be {action}d")


def test_a_running_job_being_cancelled_cannot_be_paused(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "test-worker", 60) is not None
    post(client, job_id, "cancel")

    error = post(client, job_id, "pause", 409)["error"]
    assert "is being cancelled" in error["message"]


def test_a_paused_job_is_cancelled_at_once(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    post(client, job_id, "pause")

    cancelled = post(client, job_id, "cancel")

    assert (cancelled["status"], cancelled["error"]) == ("CANCELLED", "cancelled by the user")


def test_another_tenants_job_cannot_be_paused_or_resumed(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}

    for action in ("pause", "resume"):
        assert client.post(f"{URL}/{job_id}/{action}", headers=other).status_code == 404
    assert client.get(f"{URL}/{job_id}").json()["status"] == "QUEUED"


def test_both_routes_are_documented_as_tunery_extensions(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for action in ("pause", "resume"):
        operation = paths[f"{URL}/{{job_id}}/{action}"]["post"]
        assert "(Tunery extension)" in operation["summary"]
        assert {"404", "409"} <= operation["responses"].keys()


@pytest.fixture
def capped_client(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """A client whose tenant may have one active job."""
    monkeypatch.setenv("TUNERY_MAX_ACTIVE_JOBS_PER_TENANT", "1")
    from api.main import create_app

    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {new_key('capped')}"
        yield client


def test_a_paused_job_keeps_its_place_under_the_active_jobs_cap(
    capped_client: TestClient,
) -> None:
    job_id = submit(capped_client)["job_id"]
    post(capped_client, job_id, "pause")

    refused = capped_client.post(URL, json=make_payload())

    assert refused.status_code == 429
    assert "1 queued, running or paused jobs" in refused.json()["error"]["message"]
    post(capped_client, job_id, "cancel")
    assert capped_client.post(URL, json=make_payload()).status_code == 201
