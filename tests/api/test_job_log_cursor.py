"""Following a job's log: timestamped lines with ids, and `after=<id>` for only the newer ones."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from tests.api.test_finetune_routes import submit

LOG_ROUTES = ("/v1/finetune/llm/{job_id}/logs", "/v1/deploy/logs/{job_id}")


def _running_job(client: TestClient) -> tuple[str, int]:
    job_id = submit(client)["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "test-worker", 60)
        assert claim is not None
    return job_id, claim.attempt


def _write(job_id: str, attempt: int, *lines: str) -> None:
    with session_scope() as session:
        for line in lines:
            jobs.append_log(session, job_id, attempt, line)


@pytest.mark.parametrize("route", LOG_ROUTES)
def test_log_lines_carry_their_id_time_and_attempt_beside_the_plain_strings(
    client: TestClient, route: str
) -> None:
    job_id, attempt = _running_job(client)
    _write(job_id, attempt, "line 0", "line 1")
    body = client.get(route.format(job_id=job_id)).json()
    assert body["logs"] == ["line 0", "line 1"]
    assert [line["line"] for line in body["lines"]] == body["logs"]
    assert {line["attempt"] for line in body["lines"]} == {attempt}
    first, second = body["lines"]
    assert first["id"] < second["id"] == body["next_after"]
    stamps = [datetime.fromisoformat(line["at"]) for line in body["lines"]]
    assert all(stamp.tzinfo is not None for stamp in stamps)
    assert stamps[0] <= stamps[1]


@pytest.mark.parametrize("route", LOG_ROUTES)
def test_after_returns_only_newer_lines_so_a_follower_sees_each_line_once(
    client: TestClient, route: str
) -> None:
    job_id, attempt = _running_job(client)
    url = route.format(job_id=job_id)
    _write(job_id, attempt, "a", "b", "c")
    seen: list[str] = []
    cursor = 0
    for written in (["d"], [], ["e", "f", "g"]):
        _write(job_id, attempt, *written)
        while True:
            body = client.get(url, params={"after": cursor, "n_lines": 2}).json()
            seen += body["logs"]
            if not body["logs"]:
                assert body["next_after"] == cursor
                break
            cursor = body["next_after"]
    assert seen == ["a", "b", "c", "d", "e", "f", "g"]


def test_after_reads_oldest_first_while_a_plain_request_reads_the_tail(
    client: TestClient,
) -> None:
    job_id, attempt = _running_job(client)
    url = f"/v1/finetune/llm/{job_id}/logs"
    _write(job_id, attempt, *(f"line {i}" for i in range(5)))
    tail = client.get(url, params={"n_lines": 2}).json()
    assert tail["logs"] == ["line 3", "line 4"]
    start = client.get(url, params={"n_lines": 2, "after": 0}).json()
    assert start["logs"] == ["line 0", "line 1"]
    rest = client.get(url, params={"after": start["next_after"]}).json()
    assert rest["logs"] == ["line 2", "line 3", "line 4"]


def test_after_skips_lines_of_other_jobs_and_an_empty_log_starts_at_zero(
    client: TestClient,
) -> None:
    job_id, attempt = _running_job(client)
    other_id, other_attempt = _running_job(client)
    url = f"/v1/finetune/llm/{job_id}/logs"
    empty = client.get(url).json()
    assert (empty["logs"], empty["lines"], empty["next_after"]) == ([], [], 0)
    _write(job_id, attempt, "mine 1")
    _write(other_id, other_attempt, "theirs")
    _write(job_id, attempt, "mine 2")
    first = client.get(url, params={"after": 0, "n_lines": 1}).json()
    assert first["logs"] == ["mine 1"]
    assert client.get(url, params={"after": first["next_after"]}).json()["logs"] == ["mine 2"]


@pytest.mark.parametrize("after", [-1, jobs.MAX_LOG_ID + 1, "last"])
def test_an_after_that_is_no_line_id_is_a_422_naming_it(
    client: TestClient, after: object
) -> None:
    job_id, _ = _running_job(client)
    response = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"after": after})
    assert response.status_code == 422
    assert [f["path"] for f in response.json()["error"]["fields"]] == ["after"]
