"""A deployment's URL as an OpenAI base URL: the official `openai` client, pointed at it,
gets its answers from the deployment's adapter, whatever model it names.

The engine is the recording one of tests/api/test_inference_routes.py (a real HTTP server on
127.0.0.1), so that what the API asks of it can be checked exactly."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from shared.served_models import adapter_name
from tests.api.test_deployments import completed_job, deploy
from tests.api.test_inference_routes import RecordingEngine
from tests.api.test_inference_routes import engine as engine  # noqa: PLC0414 - the fixture

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def openai_at(client: TestClient, url: str) -> OpenAI:
    key = client.headers["Authorization"].removeprefix("Bearer ")
    # The TestClient is an httpx.Client that reaches the app in process.
    return OpenAI(base_url=url, api_key=key, http_client=client, max_retries=0)


def test_the_official_openai_client_chats_with_the_deployments_adapter(
    engine: RecordingEngine, client: TestClient,
) -> None:
    job_id = completed_job(client)
    deployed = deploy(client, job_id, deployment_name="support-bot")
    chat = openai_at(client, deployed["URL"])

    answer = chat.chat.completions.create(model="anything-at-all", messages=MESSAGES)
    assert answer.choices[0].message.content == "hello"
    assert answer.model == "anything-at-all"
    route, sent, _headers = engine.requests[-1]
    assert route == "chat/completions"
    assert sent["model"] == adapter_name(job_id)
    assert sent["messages"] == MESSAGES

    chunks = chat.chat.completions.create(model="support-bot", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hello"
    assert engine.requests[-1][1]["model"] == adapter_name(job_id)

    status = client.get(f"/v1/deploy/status/{deployed['deployment_id']}").json()
    assert status["requests_served"] == 2
    assert status["last_request_at"] is not None


def test_max_model_len_bounds_the_tokens_a_request_may_ask(
    engine: RecordingEngine, client: TestClient,
) -> None:
    deployed = deploy(client, completed_job(client), max_model_len=100)
    chat = openai_at(client, deployed["URL"])
    try:
        chat.chat.completions.create(model="m", messages=MESSAGES, max_tokens=101)
        raise AssertionError("101 tokens were accepted")
    except BadRequestError as refused:
        assert refused.body["param"] == "max_tokens"  # type: ignore[index]
        assert "max_model_len" in refused.message
    assert engine.requests == []
    chat.chat.completions.create(model="m", messages=MESSAGES)
    assert engine.requests[-1][1]["max_tokens"] == 100
    status = client.get(f"/v1/deploy/status/{deployed['deployment_id']}").json()
    assert status["requests_served"] == 1


def test_a_bad_chat_body_is_an_openai_400_naming_the_field(
    engine: RecordingEngine, client: TestClient,
) -> None:
    deployed = deploy(client, completed_job(client))
    answer = client.post(f"{deployed['URL']}/chat/completions",
                         json={"model": "m", "messages": [], "temperature": 9})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] in ("messages", "temperature")
    assert engine.requests == []
