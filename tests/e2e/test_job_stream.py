"""A training job's stream on real API and worker processes: a client that drops its
connection several times and comes back with the last id it received sees every row the job
wrote exactly once, as the JSON routes show them afterwards, and then `end`; openai-python's
own SSE reader reads the OpenAI dialect's stream; an open stream does not keep the API from
stopping."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI, Stream
from openai.types.fine_tuning import FineTuningJobEvent

from cli.local_stack import LocalStack
from shared.job_feed import FeedCursor
from tests.api.test_job_stream import Event, parse_sse
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import create_key, stack_env, tiny_payload

EVENTS_PER_CONNECTION = 7
DROPPED_CONNECTIONS = 4


def read_with_reconnects(client: httpx.Client, job_id: str) -> tuple[list[Event], int]:
    """The stream's id-carrying events as a client reads them that hangs up after a few
    events, `DROPPED_CONNECTIONS` times, and comes back with the last id it received (in the
    header, or once in the query as a client that cannot set headers does); the connections
    it took."""
    seen: list[Event] = []
    connections = 0
    while not seen or seen[-1].name != "end":
        connections += 1
        assert connections < 200, "the stream never ended"
        resume: dict[str, Any] = {}
        if seen and connections == 3:
            resume["params"] = {"last_event_id": seen[-1].id}
        elif seen:
            resume["headers"] = {"Last-Event-ID": seen[-1].id}
        with client.stream("GET", f"/v1/finetune/llm/{job_id}/stream", **resume) as response:
            assert response.status_code == 200, response.read()
            taken = 0
            for event in parse_sse(response.iter_lines()):
                if event.name in ("job", ":"):
                    continue
                seen.append(event)
                taken += 1
                if event.name == "end":
                    break
                if connections <= DROPPED_CONNECTIONS and taken == EVENTS_PER_CONNECTION:
                    break  # leaving the block closes the connection mid-stream
    return seen, connections


def openai_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every event of the OpenAI dialect's list, newest first, through its pages."""
    events: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        params["after"] = page["data"][-1]["id"]


def test_a_client_that_reconnects_with_its_last_id_sees_each_row_once_then_end(
        tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_RATE_LIMIT_PER_MINUTE="0", TUNERY_STREAM_POLL_S="0.2")
    stack = start_stack(env)
    key = create_key(env)
    with httpx.Client(base_url=stack.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        job_id = client.post("/v1/finetune/llm", json=tiny_payload(tiny_model_dir)).json()[
            "job_id"]
        seen, connections = read_with_reconnects(client, job_id)

        job = client.get(f"/v1/finetune/llm/{job_id}").json()
        logs = client.get(f"/v1/finetune/llm/{job_id}/logs",
                          params={"after": 0, "n_lines": 10000}).json()["lines"]
        metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
        listed = openai_events(client, job_id)

    assert connections == DROPPED_CONNECTIONS + 1
    assert job["status"] == "COMPLETED"
    end = seen[-1]
    assert end.json() == {"status": "COMPLETED"}
    rows = seen[:-1]
    ids = [event.id for event in rows]
    assert len(set(ids)) == len(ids) and end.id == ids[-1]
    assert [e.json() for e in rows if e.name == "log"] == logs
    assert [e.json() for e in rows if e.name == "metric"] == metrics
    assert len(logs) > 20 and len(metrics) > 10
    statuses = [e for e in rows if e.name == "status"]
    assert [e.json()["to_status"] for e in statuses] == ["QUEUED", "RUNNING", "COMPLETED"]
    # Which job_events rows the stream sent (its ids say, see shared.job_feed) against those
    # the OpenAI dialect lists, `ftevent-s<row>-<part>`.
    streamed_rows = [FeedCursor.parse(e.id).status for e in statuses]  # type: ignore[arg-type]
    listed_rows = sorted({int(e["id"].split("-")[1][1:]) for e in listed
                          if e["id"].startswith("ftevent-s")})
    assert streamed_rows == listed_rows


def test_openai_pythons_sse_reader_reads_the_event_stream_to_done(
        tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_RATE_LIMIT_PER_MINUTE="0", TUNERY_STREAM_POLL_S="0.2")
    stack = start_stack(env)
    key = create_key(env)
    with httpx.Client(base_url=stack.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        job_id = client.post("/v1/finetune/llm", json=tiny_payload(tiny_model_dir)).json()[
            "job_id"]
        openai = OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        # list_events takes no stream argument: the SDK's generic request with its own SSE
        # reader, as a user would reach the route. It ends at `[DONE]`, after the job ended.
        stream = openai.get(f"/fine_tuning/jobs/ftjob-{job_id}/events",
                            cast_to=FineTuningJobEvent, options={"params": {"stream": "true"}},
                            stream=True, stream_cls=Stream[FineTuningJobEvent])
        streamed = [event.model_dump(mode="json", exclude_none=True) for event in stream]
        assert client.get(f"/v1/finetune/llm/{job_id}").json()["status"] == "COMPLETED"
        listed = openai_events(client, job_id)
    assert streamed == [
        FineTuningJobEvent.model_validate(e).model_dump(mode="json", exclude_none=True)
        for e in reversed(listed)]
    assert streamed[-1]["message"] == "The job has successfully completed"


def test_an_open_stream_does_not_keep_the_api_from_stopping_on_sigterm(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir])
    stack = LocalStack(env=env, log_dir=tmp_path / "logs")
    try:
        stack.start_api()  # no worker: the job stays queued and its stream open
        key = create_key(env)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=stack.base_url, timeout=60, headers=headers) as client:
            job_id = client.post("/v1/finetune/llm",
                                 json=tiny_payload(tiny_model_dir)).json()["job_id"]
            opened, closed = threading.Event(), threading.Event()

            def follow() -> None:
                try:
                    with client.stream("GET", f"/v1/finetune/llm/{job_id}/stream") as response:
                        for _ in parse_sse(response.iter_lines()):
                            opened.set()
                except httpx.HTTPError:
                    pass  # cut by the server, as a client then sees it
                closed.set()

            threading.Thread(target=follow, daemon=True).start()
            assert opened.wait(timeout=60)
            assert stack.api is not None
            os.killpg(stack.api.pid, signal.SIGTERM)
            # LocalStack would SIGKILL it after 20 s; it stops by itself well before, on the
            # signal it was sent, and the stream's client sees its connection end.
            assert stack.api.wait(timeout=60) == -signal.SIGTERM
            assert closed.wait(timeout=60)
    finally:
        stack.stop()
