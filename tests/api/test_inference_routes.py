"""The inference face in process: which models a key sees and may call, how requests are
checked, and how the API forwards to an engine and passes its answers and errors on.

The engine here is a small recording HTTP server on 127.0.0.1 (a real socket, a real
uvicorn), so that what the API sends an engine and what it does with each kind of engine
answer can be checked exactly; the real engine answers the official client in
tests/e2e/test_inference_client.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.models import JobStatus
from shared.served_models import adapter_name
from tests.api.conftest import new_key

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKEN = "engine-secret-token"


class RecordingEngine:
    """An OpenAI-compatible engine that records each request and answers as told."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.reply: tuple[int, Any] | None = None
        self.cut_stream = False
        app = FastAPI()

        @app.post("/v1/{route:path}")
        async def answer(route: str, request: Request) -> Response:
            body = await request.json()
            self.requests.append((route, body, dict(request.headers)))
            if self.reply is not None:
                status, content = self.reply
                return JSONResponse(content, status) if not isinstance(content, bytes) \
                    else Response(content, status)
            if body.get("stream"):
                return StreamingResponse(self._chunks(body, self.cut_stream),
                                         media_type="text/event-stream")
            return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                                 "model": body["model"], "choices": [{
                                     "index": 0, "finish_reason": "stop", "message": {
                                         "role": "assistant", "content": "hello"}}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                           "total_tokens": 4}})

        self.app = app

    @staticmethod
    async def _chunks(body: dict[str, Any], cut: bool) -> Any:
        for text in ("hel", "lo"):
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                     "model": body["model"], "choices": [
                         {"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            if cut:  # as an engine killed mid-answer: no [DONE]
                return
        yield "data: [DONE]\n\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def engine(tunery_env: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingEngine]:
    recording = RecordingEngine()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(recording.app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    monkeypatch.setenv("TUNERY_INFERENCE_ENGINE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TUNERY_INFERENCE_ENGINE_TOKEN", TOKEN)
    monkeypatch.setenv("TUNERY_INFERENCE_BASE_MODELS", json.dumps([MODEL]))
    monkeypatch.setenv("TUNERY_OPENAI_MODEL_ALIASES", json.dumps({"gpt-4o-mini": MODEL}))
    monkeypatch.setenv("TUNERY_RATE_LIMIT_PER_MINUTE", "0")
    from shared.settings import get_settings

    get_settings.cache_clear()
    yield recording
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(engine: RecordingEngine, app_client: TestClient, api_key: str) -> TestClient:
    app_client.headers["Authorization"] = f"Bearer {api_key}"
    return app_client


def completed_job(client: TestClient, payload: dict[str, Any], **openai: Any) -> str:
    job_id = client.post("/v1/finetune/llm", json=payload).json()["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "worker-test", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=1, result={})
    return job_id


def chat(client: TestClient, model: str, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], **body})


def fine_tuned_name(client: TestClient, job_id: str) -> str:
    name = client.get(f"/v1/fine_tuning/jobs/ftjob-{job_id}").json()["fine_tuned_model"]
    assert name.startswith("ft:")
    return str(name)


def test_models_lists_offered_bases_and_only_this_tenants_finished_models(
        client: TestClient, payload: dict[str, Any]) -> None:
    mine = completed_job(client, payload)
    running = client.post("/v1/finetune/llm", json=payload).json()["job_id"]
    other = TestClient(client.app, headers={"Authorization": f"Bearer {new_key('tenant-b')}"})
    theirs = completed_job(other, payload)
    listed = client.get("/v1/models").json()
    names = [m["id"] for m in listed["data"]]
    assert listed["object"] == "list"
    assert names == [MODEL, "gpt-4o-mini", fine_tuned_name(client, mine)]
    assert all(m["object"] == "model" for m in listed["data"])
    assert fine_tuned_name(other, theirs) not in names and running not in str(names)
    one = client.get(f"/v1/models/{fine_tuned_name(client, mine)}")
    assert one.status_code == 200 and one.json()["owned_by"] == "tenant-a"
    for name in (fine_tuned_name(other, theirs), theirs, f"ftjob-{theirs}", "gpt-5", running):
        refused = client.get(f"/v1/models/{name}")
        assert refused.status_code == 404, name
        assert refused.json()["error"]["code"] == "model_not_found"
        assert refused.json()["error"]["param"] == "model"


def test_a_fine_tuned_model_goes_to_the_engine_as_its_adapter_with_the_engines_token(
        client: TestClient, engine: RecordingEngine, payload: dict[str, Any]) -> None:
    job_id = completed_job(client, payload)
    name = fine_tuned_name(client, job_id)
    for model in (name, job_id, f"ftjob-{job_id}"):
        answer = chat(client, model, max_completion_tokens=7, temperature=0, user="someone",
                      seed=3, stop="\n")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model
        assert answer.json()["choices"][0]["message"]["content"] == "hello"
        route, body, headers = engine.requests[-1]
        assert route == "chat/completions"
        assert body == {"model": adapter_name(job_id), "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 7, "temperature": 0.0,
            "seed": 3, "stop": "\n", "stream": False}
        assert headers["authorization"] == f"Bearer {TOKEN}"
    base = chat(client, "gpt-4o-mini")
    assert base.status_code == 200 and engine.requests[-1][1]["model"] == MODEL
    assert engine.requests[-1][1]["max_tokens"] == 256


def test_a_streamed_answer_passes_through_chunk_by_chunk_in_the_callers_names(
        client: TestClient, engine: RecordingEngine, payload: dict[str, Any]) -> None:
    job_id = completed_job(client, payload)
    name = fine_tuned_name(client, job_id)
    with client.stream("POST", "/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "hello"
    assert {c["model"] for c in chunks} == {name}
    assert engine.requests[-1][1]["stream_options"] == {"include_usage": True}


def test_completions_forward_a_prompt(client: TestClient, engine: RecordingEngine) -> None:
    answer = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"],
                                                  "max_tokens": 2})
    assert answer.status_code == 200
    assert engine.requests[-1][0] == "completions"
    assert engine.requests[-1][1]["prompt"] == ["a", "b"]


@pytest.mark.parametrize(("body", "param"), [
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"max_completion_tokens": 100000}, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"n": 99}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_requests_name_the_parameter_in_openais_envelope(
        client: TestClient, engine: RecordingEngine, body: dict[str, Any], param: str) -> None:
    answer = chat(client, MODEL, **body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error
    assert answer.headers["x-should-retry"] == "false"
    assert engine.requests == []


def test_another_tenants_model_is_not_found_and_never_reaches_the_engine(
        client: TestClient, engine: RecordingEngine, payload: dict[str, Any]) -> None:
    other = TestClient(client.app, headers={"Authorization": f"Bearer {new_key('tenant-b')}"})
    theirs = completed_job(other, payload)
    for model in (fine_tuned_name(other, theirs), theirs, f"ftjob-{theirs}",
                  "ft:x:y::00000000", "../../etc/passwd"):
        refused = chat(client, model)
        assert refused.status_code == 404, model
        assert refused.json()["error"]["code"] == "model_not_found"
    assert engine.requests == []
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}]}, headers={"Authorization": "Bearer nope"}
    ).status_code == 401


def test_engine_errors_reach_the_caller_in_its_names_and_faults_are_503_or_502(
        client: TestClient, engine: RecordingEngine, payload: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = completed_job(client, payload)
    name = fine_tuned_name(client, job_id)
    engine.reply = (400, {"error": {"message": f"{adapter_name(job_id)}: prompt too long",
                                    "type": "invalid_request_error", "param": "messages",
                                    "code": "context_length_exceeded"}})
    refused = chat(client, name)
    assert refused.status_code == 400
    assert refused.json()["error"] == {"message": f"{name}: prompt too long",
                                       "type": "invalid_request_error", "param": "messages",
                                       "code": "context_length_exceeded"}
    engine.reply = (404, {"error": {"message": "no adapter", "code": "model_not_found"}})
    assert chat(client, name).status_code == 404
    engine.reply = (500, b"Traceback (most recent call last): secret internals")
    broken = chat(client, name)
    assert broken.status_code == 502 and "Traceback" not in broken.text
    engine.reply = (401, {"error": {"message": "bad token"}})
    assert chat(client, name).status_code == 503
    monkeypatch.setenv("TUNERY_INFERENCE_ENGINE_URL", f"http://127.0.0.1:{_free_port()}")
    from shared.settings import get_settings

    get_settings.cache_clear()
    down = chat(client, name)
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "engine_unavailable"
    assert "127.0.0.1" not in down.text


def test_a_base_served_elsewhere_goes_to_its_own_engine(
        client: TestClient, engine: RecordingEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.settings import get_settings

    monkeypatch.setenv("TUNERY_INFERENCE_ENGINES",
                       json.dumps({MODEL: f"http://127.0.0.1:{_free_port()}"}))
    get_settings.cache_clear()
    assert chat(client, MODEL).status_code == 503
    assert engine.requests == []


def test_a_stream_the_engine_cuts_short_ends_with_an_error_event_not_done(
        client: TestClient, engine: RecordingEngine) -> None:
    engine.cut_stream = True
    with client.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert "data: [DONE]" not in lines
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "engine_error" and error["type"] == "server_error"
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == "hel"


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/completions", {"prompt": [1, 2]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]},
     "messages.0.tool_call_id"),
])
def test_the_param_named_is_the_field_sent_not_a_type_of_it(
        client: TestClient, engine: RecordingEngine, route: str, body: dict[str, Any],
        param: str) -> None:
    answer = client.post(route, json={"model": MODEL, **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert engine.requests == []


def test_a_full_finetunes_model_is_refused_by_name_and_never_reaches_the_engine(
        client: TestClient, engine: RecordingEngine, payload: dict[str, Any]) -> None:
    full = {**payload, "pretrainedmodel_config": {**payload["pretrainedmodel_config"],
                                                  "use_lora": False}}
    job_id = completed_job(client, full)
    for model in (fine_tuned_name(client, job_id), job_id):
        refused = chat(client, model)
        # The OpenAI dialect answers a refused parameter as OpenAI does: 400.
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "model_not_servable" and error["param"] == "model"
        assert "trained the whole model (use_lora false)" in error["message"]
    assert engine.requests == []
    # Still a model of the tenant's: listed and retrievable, as its job is.
    assert client.get(f"/v1/models/{fine_tuned_name(client, job_id)}").status_code == 200
