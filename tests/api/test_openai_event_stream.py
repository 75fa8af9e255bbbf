"""`GET /v1/fine_tuning/jobs/{id}/events?stream=true`: the events the list pages through,
oldest first, as plain server-sent events ending with `data: [DONE]` (openai-python's
`list_events` has no stream argument; its SSE reader is tested on a real stack in
tests/e2e/test_job_stream.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import new_key
from tests.api.test_job_stream import Event, parse_sse
from tests.api.test_openai_dialect import _finish, chat_lines, create, upload


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_STREAM_POLL_S", "0.05")


def finished_job(client: TestClient) -> dict[str, Any]:
    job = create(client, upload(client, chat_lines(10)).json()["id"]).json()
    _finish(job["tunery_job_id"], steps=4)
    return job


def listed(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    """Every event through the list's pages, newest first."""
    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        seen += page["data"]
        if not page["has_more"]:
            return seen
        params["after"] = page["data"][-1]["id"]


def streamed(client: TestClient, job_id: str, **request: Any) -> list[Event]:
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                       params={"stream": "true"}, **request) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(response.iter_lines()))


def test_the_stream_sends_the_listed_events_oldest_first_then_done(client: TestClient) -> None:
    job = finished_job(client)
    events = streamed(client, job["id"])
    assert {e.name for e in events} == {"message"}  # no event names: `data:` lines only
    assert events[-1].data == "[DONE]"
    sent = [json.loads(e.data) for e in events[:-1]]
    assert sent == list(reversed(listed(client, job["id"])))
    assert sent[-1]["message"] == "The job has successfully completed"
    assert all(e["object"] == "fine_tuning.job.event" for e in sent)
    # The Tunery id reads the same stream.
    assert streamed(client, job["tunery_job_id"]) == events


def test_an_eventsource_that_reconnects_goes_on_after_the_last_id_it_received(
        client: TestClient) -> None:
    job = finished_job(client)
    events = streamed(client, job["id"])
    with_ids = [i for i, e in enumerate(events) if e.id]
    # The creation reads as two events, the id on the second: a reconnect never splits a row.
    assert events[0].id is None and events[1].id
    middle = with_ids[len(with_ids) // 2]
    resumed = streamed(client, job["id"], headers={"Last-Event-ID": events[middle].id})
    assert resumed == events[middle + 1:]


def test_a_stream_takes_no_list_cursor_and_no_malformed_event_id(client: TestClient) -> None:
    job = finished_job(client)
    url = f"/v1/fine_tuning/jobs/{job['id']}/events"
    first = listed(client, job["id"])[0]["id"]
    with_after = client.get(url, params={"stream": "true", "after": first})
    assert with_after.status_code == 400
    assert with_after.json()["error"]["param"] == "after"
    malformed = client.get(url, params={"stream": "true"}, headers={"Last-Event-ID": first})
    assert malformed.status_code == 400
    assert malformed.json()["error"]["param"] == "Last-Event-ID"
    assert malformed.json()["error"]["type"] == "invalid_request_error"


def test_another_tenants_job_streams_nothing(client: TestClient) -> None:
    job = finished_job(client)
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    response = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                          params={"stream": "true"}, headers=other)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
