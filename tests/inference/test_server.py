"""`python -m inference` as a real process on 127.0.0.1, answered through the official
`openai` client, as the API's forwarding and users' scripts talk to it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cli.local_stack import engine_alone

TOKEN = "engine-test-token"


@pytest.fixture
def engine_process(engine_env: Path, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TUNERY_INFERENCE_ENGINE_TOKEN", TOKEN)
    try:
        with engine_alone(dict(os.environ), tmp_path, timeout_s=120) as url:
            yield url
    except (RuntimeError, TimeoutError) as exc:
        log = tmp_path / "inference.log"
        raise AssertionError(f"{exc}:\n{log.read_text() if log.exists() else ''}") from None


def test_the_openai_client_chats_streams_and_completes(
        engine_process: str, tiny_model_dir: Path,
        stored_adapter: Callable[..., str]) -> None:
    import openai

    adapter = stored_adapter(31)
    client = openai.OpenAI(base_url=f"{engine_process}/v1", api_key=TOKEN, max_retries=0)
    messages = [{"role": "user", "content": "Name three colors."}]

    chat = client.chat.completions.create(model=adapter, messages=messages, max_tokens=5,
                                          temperature=0)
    assert chat.model == adapter and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens <= 5

    stream = client.chat.completions.create(
        model=adapter, messages=messages, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    completion = client.completions.create(model=str(tiny_model_dir), prompt="Hello",
                                           max_tokens=4, temperature=0, n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].text == completion.choices[1].text  # greedy

    assert {m.id for m in client.models.list()} == {str(tiny_model_dir), adapter}

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="tunery-job-00000000-0000-4000-8000-000000000000", messages=messages)
    assert missing.value.code == "model_not_found"
    wrong_key = openai.OpenAI(base_url=f"{engine_process}/v1", api_key="wrong",
                              max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


def test_a_client_that_disconnects_mid_stream_frees_its_row(
        engine_process: str, tiny_model_dir: Path) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    # Greedy, this prompt never reaches EOS within 400 tokens on the tiny model.
    body = {"model": str(tiny_model_dir), "max_tokens": 400, "temperature": 0,
            "prompt": "### Instruction: Name three colors.\n### Response:"}
    with httpx.Client(base_url=engine_process, headers=headers, timeout=60) as http:
        whole = http.post("/v1/completions", json=body).json()
        assert whole["usage"]["completion_tokens"] == 400
        before = http.get("/health").json()["decoded_tokens"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert next(response.iter_lines()).startswith("data: ")
        deadline = time.monotonic() + 60
        while (health := http.get("/health").json())["running_rows"] or \
                health["waiting_rows"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
    assert health["decoded_tokens"] - before < 400
