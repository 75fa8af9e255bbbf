"""`GET /v1/finetune/llm/{id}/stream`, in process: the contract's events in order, resuming
from any event's id, a malformed cursor, another tenant's job, a live job followed to its end,
pings while idle, and what an open stream holds: no database connection, and no polling once
its client has gone (that one through a real uvicorn server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import api.feed_stream
from cli.sse import ServerSentEvent, read_events
from shared import jobs
from shared.db import session_scope
from shared.models import JobStatus
from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.api.test_finetune_routes import submit

POLL_S = 0.05


Event = ServerSentEvent


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Server-sent events as a browser reads them; a comment reads as an event named ':'."""
    return read_events(lines, comments=True)


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch, tunery_env: Path) -> None:
    monkeypatch.setenv("TUNERY_STREAM_POLL_S", str(POLL_S))


def url(job_id: str) -> str:
    return f"/v1/finetune/llm/{job_id}/stream"


def read_stream(client: TestClient, job_id: str, **request: Any) -> list[Event]:
    with client.stream("GET", url(job_id), **request) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(response.iter_lines()))


def run(client: TestClient) -> tuple[str, int]:
    job_id = submit(client)["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "test-worker", 60)
        assert claim is not None
    return job_id, claim.attempt


def write_rows(job_id: str, attempt: int, steps: range) -> None:
    # A transaction each, as a worker's step writes them: one flush would insert every row
    # of one table before the other's, whatever order they were added in.
    for step in steps:
        with session_scope() as session:
            jobs.record_metric(session, job_id, attempt, step,
                               {"loss": 2.0 / step, "total_steps": 10.0})
        with session_scope() as session:
            jobs.append_log(session, job_id, attempt, f"step {step}/10 | loss {2.0 / step:.4f}")


def finish(job_id: str, attempt: int, to: JobStatus = JobStatus.COMPLETED) -> None:
    with session_scope() as session:
        assert jobs.transition(session, job_id, to, attempt=attempt, reason="done")


def finished_job(client: TestClient) -> str:
    job_id, attempt = run(client)
    write_rows(job_id, attempt, range(1, 6))
    finish(job_id, attempt)
    return job_id


def test_a_finished_jobs_stream_sends_the_job_then_each_row_as_the_json_routes_show_it_then_end(
        client: TestClient) -> None:
    job_id = finished_job(client)
    events = read_stream(client, job_id)

    assert events[0].name == "job" and events[0].id is None
    assert events[0].json() == client.get(f"/v1/finetune/llm/{job_id}").json()
    rows, end = events[1:-1], events[-1]
    assert {e.name for e in rows} == {"status", "log", "metric"}
    assert all(e.id for e in rows)
    logs = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"after": 0}).json()["lines"]
    assert [e.json() for e in rows if e.name == "log"] == logs
    metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
    assert [e.json() for e in rows if e.name == "metric"] == metrics
    statuses = [e.json() for e in rows if e.name == "status"]
    assert [(s["from_status"], s["to_status"]) for s in statuses] == [
        (None, "QUEUED"), ("QUEUED", "RUNNING"), ("RUNNING", "COMPLETED")]
    assert statuses[-1]["reason"] == "done" and statuses[-1]["attempt"] == 1
    assert (end.name, end.json(), end.id) == ("end", {"status": "COMPLETED"}, rows[-1].id)
    # Oldest first: a step's metric, then its log line; the completion last.
    assert [e.name for e in rows[-3:]] == ["metric", "log", "status"]


def test_resuming_from_any_events_id_sends_exactly_the_events_after_it(
        client: TestClient) -> None:
    job_id = finished_job(client)
    events = read_stream(client, job_id)
    rows = events[1:-1]
    for i, event in enumerate(rows):
        resumed = read_stream(client, job_id, headers={"Last-Event-ID": event.id})
        assert resumed[0].name == "job"
        assert resumed[1:] == [*rows[i + 1:], events[-1]], i
    by_query = read_stream(client, job_id, params={"last_event_id": rows[3].id})
    assert by_query[1:] == [*rows[4:], events[-1]]
    # The header wins: EventSource sends it on reconnecting to the URL first given.
    both = read_stream(client, job_id, params={"last_event_id": rows[0].id},
                       headers={"Last-Event-ID": rows[5].id})
    assert both[1:] == [*rows[6:], events[-1]]
    # The end's id resumes to nothing more than the end itself.
    again = read_stream(client, job_id, headers={"Last-Event-ID": events[-1].id})
    assert [e.name for e in again] == ["job", "end"]


@pytest.mark.parametrize("sent", [
    {"headers": {"Last-Event-ID": "12"}},
    {"headers": {"Last-Event-ID": "s1.l2.m3; DROP TABLE jobs"}},
    {"headers": {"Last-Event-ID": f"s{2**31}.l0.m0"}},
    {"params": {"last_event_id": "ftevent-l3-0"}},
    {"headers": {"Last-Event-ID": "nonsense"}, "params": {"last_event_id": "s1.l1.m1"}},
])
def test_a_malformed_cursor_is_a_400_naming_last_event_id(
        client: TestClient, sent: dict[str, Any]) -> None:
    job_id = finished_job(client)
    response = client.get(url(job_id), **sent)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "Last-Event-ID" in error["message"]
    assert [f["path"] for f in error["fields"]] == ["Last-Event-ID"]


def test_another_tenants_job_is_the_same_404_as_an_unknown_one(client: TestClient) -> None:
    job_id = finished_job(client)
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    theirs = client.get(url(job_id), headers=other)
    unknown = client.get(url("0" * 8), headers=other)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
    assert theirs.json()["error"]["message"] == f"no job with id {job_id}"
    assert client.get(url(job_id), headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_live_job_streams_rows_as_they_are_written_and_ends_with_its_end(
        client: TestClient) -> None:
    job_id, attempt = run(client)
    with client.stream("GET", url(job_id)) as response:
        events = parse_sse(response.iter_lines())
        first = next(events)
        assert first.name == "job" and first.json()["status"] == "RUNNING"
        assert [next(events).json()["to_status"] for _ in range(2)] == ["QUEUED", "RUNNING"]
        write_rows(job_id, attempt, range(1, 3))
        assert [next(events).name for _ in range(4)] == ["metric", "log", "metric", "log"]
        with session_scope() as session:
            jobs.set_phase(session, jobs.Claim(job_id, attempt, "test-worker"),
                           phase="training", progress=0.5)
        changed = next(events)
        assert changed.name == "job"
        assert (changed.json()["phase"], changed.json()["progress"]) == ("training", 0.5)
        finish(job_id, attempt, JobStatus.FAILED)
        rest = list(events)
    # The job's new state after the rows that led to it.
    assert [e.name for e in rest] == ["status", "job", "end"]
    assert rest[1].json()["status"] == "FAILED"
    assert rest[-1].json() == {"status": "FAILED"}


def test_an_idle_stream_sends_a_ping_comment(client: TestClient,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_STREAM_HEARTBEAT_S", str(POLL_S * 2))
    get_settings.cache_clear()  # the app reads its settings per request
    job_id = submit(client)["job_id"]  # queued, and no worker: nothing happens to it
    with client.stream("GET", url(job_id)) as response:
        events = parse_sse(response.iter_lines())
        names = [next(events).name for _ in range(4)]
    assert names == ["job", "status", ":", ":"]


def test_an_open_idle_stream_holds_no_database_connection(
        served: tuple[str, Callable[[], int]], monkeypatch: pytest.MonkeyPatch) -> None:
    base_url, checked_out = served
    # Each poll holds a connection for its one read: the pool is looked at between reads only,
    # never while one is under way.
    reading = threading.Lock()
    reads = []
    real_read = api.feed_stream._read_in_session

    def one_read_at_a_time(*args: Any) -> Any:
        with reading:
            reads.append(time.monotonic())
            return real_read(*args)

    monkeypatch.setattr(api.feed_stream, "_read_in_session", one_read_at_a_time)
    headers = {"Authorization": f"Bearer {new_key('follower')}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as client:
        job_id = client.post("/v1/finetune/llm", json=_payload()).json()["job_id"]
        # Twice: the second request's key needs no last_used_at commit, which would have
        # handed the request's connection back on its own.
        client.get(f"/v1/finetune/llm/{job_id}")
        with client.stream("GET", url(job_id)) as response:
            events = parse_sse(response.iter_lines())
            assert [next(events).name for _ in range(2)] == ["job", "status"]
            seen: list[int] = []
            deadline = time.monotonic() + 60
            while len(seen) < 10 or len(reads) < 5:  # several polls, looked at in between
                assert time.monotonic() < deadline
                time.sleep(POLL_S * 1.5)
                with reading:
                    seen.append(checked_out())
            # The stream is still polling: a row written now arrives.
            with session_scope() as session:
                jobs.append_log(session, job_id, 0, "still followed")
            assert next(events).json()["line"] == "still followed"
    assert set(seen) == {0}


def test_a_client_that_disconnects_stops_the_polls(
        served: tuple[str, Callable[[], int]], monkeypatch: pytest.MonkeyPatch) -> None:
    base_url, _ = served
    reads = []
    real_read = api.feed_stream._read_in_session

    def counted_read(*args: Any) -> Any:
        reads.append(time.monotonic())
        return real_read(*args)

    monkeypatch.setattr(api.feed_stream, "_read_in_session", counted_read)
    headers = {"Authorization": f"Bearer {new_key('leaver')}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as client:
        job_id = client.post("/v1/finetune/llm", json=_payload()).json()["job_id"]
        with client.stream("GET", url(job_id)) as response:
            events = parse_sse(response.iter_lines())
            assert next(events).name == "job"
            wait_for(lambda: len(reads) >= 3)  # it polls while the client is there
        # The server notices the disconnect at the stream's next await: the polls stop.
        wait_for(lambda: not polled_within(reads, quiet_s=20 * POLL_S))
        settled = len(reads)
        time.sleep(20 * POLL_S)
    assert len(reads) == settled


def test_one_key_holds_at_most_its_streams_and_other_keys_are_not_held_up(
        served: tuple[str, Callable[[], int]], monkeypatch: pytest.MonkeyPatch) -> None:
    base_url, _ = served
    monkeypatch.setenv("TUNERY_STREAM_MAX_PER_KEY", "2")
    get_settings.cache_clear()
    crowd = {"Authorization": f"Bearer {new_key('crowd')}"}
    other = {"Authorization": f"Bearer {new_key('other')}"}
    with httpx.Client(base_url=base_url, headers=crowd, timeout=10) as client:
        job_id = client.post("/v1/finetune/llm", json=_payload()).json()["job_id"]
        with client.stream("GET", url(job_id)) as first, \
                client.stream("GET", url(job_id)) as second:
            assert (first.status_code, second.status_code) == (200, 200)
            refused = client.get(url(job_id))
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_streams"
            assert refused.headers["Retry-After"]
            elsewhere = client.get(url(job_id), headers=other)
            assert elsewhere.status_code == 404  # another tenant's job: the cap is not in the way
            mine = client.post("/v1/finetune/llm", json=_payload(), headers=other).json()
            with client.stream("GET", url(mine["job_id"]), headers=other) as theirs:
                assert theirs.status_code == 200
        # Once the server has dropped the closed streams, the key may open one again.
        deadline = time.monotonic() + 10
        while (status := _open_briefly(client, url(job_id))) == 429:
            assert time.monotonic() < deadline, "the closed streams were never forgotten"
            time.sleep(POLL_S * 4)
        assert status == 200


def _open_briefly(client: httpx.Client, path: str) -> int:
    with client.stream("GET", path) as response:
        return response.status_code


def test_every_stream_reads_on_the_streams_own_few_threads(
        served: tuple[str, Callable[[], int]], monkeypatch: pytest.MonkeyPatch) -> None:
    base_url, _ = served
    monkeypatch.setenv("TUNERY_STREAM_READ_THREADS", "1")
    get_settings.cache_clear()
    reading = 0
    most = 0
    count_lock = threading.Lock()
    real_read = api.feed_stream._read_in_session

    def counted_read(*args: Any) -> Any:
        nonlocal reading, most
        with count_lock:
            reading += 1
            most = max(most, reading)
        try:
            time.sleep(POLL_S / 2)  # long enough for reads to overlap if they could
            return real_read(*args)
        finally:
            with count_lock:
                reading -= 1

    monkeypatch.setattr(api.feed_stream, "_read_in_session", counted_read)
    headers = {"Authorization": f"Bearer {new_key('many')}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as client:
        job_id = client.post("/v1/finetune/llm", json=_payload()).json()["job_id"]
        streams = [client.stream("GET", url(job_id)) for _ in range(6)]
        responses = [stream.__enter__() for stream in streams]
        try:
            for response in responses:
                assert next(parse_sse(response.iter_lines())).name == "job"
            time.sleep(POLL_S * 10)
            # The API's own thread pool is free for everyone else meanwhile.
            assert client.get(f"/v1/finetune/llm/{job_id}").status_code == 200
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    assert most == 1


def wait_for(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "still waiting"
        time.sleep(POLL_S)


def polled_within(reads: list[float], quiet_s: float) -> bool:
    return bool(reads) and time.monotonic() - reads[-1] < quiet_s


def _payload() -> dict[str, Any]:
    from tests.conftest import make_payload

    return make_payload()
