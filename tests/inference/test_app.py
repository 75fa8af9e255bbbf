"""The engine's HTTP face: OpenAI's objects and errors, streaming, sampling options, adapter
eviction and the bearer token, on the tiny Llama and peft adapters in local storage."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.settings import get_settings


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Name three colors."}],
            **extra}


def _events(response) -> list[Any]:
    """An SSE body as its data lines, JSON-decoded except the final [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), blocks
    data = [b[len("data: "):] for b in blocks]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_chat_completion_is_openais_object(engine_client, tiny_model_dir: Path) -> None:
    client = engine_client()
    response = client.post("/v1/chat/completions",
                           json=_chat(str(tiny_model_dir), max_tokens=8, temperature=0,
                                      unknown_field="ignored"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == str(tiny_model_dir) and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_stream_is_sse_chunks_then_usage_then_done(
        engine_client, stored_adapter: Callable[..., str]) -> None:
    adapter = stored_adapter(7)
    client = engine_client()
    response = client.post("/v1/chat/completions", json=_chat(
        adapter, max_completion_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert response.status_code == 200, response.text
    chunks = _events(response)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *choice_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in choice_chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in choice_chunks)
    whole = client.post("/v1/chat/completions", json=_chat(
        adapter, max_completion_tokens=6, temperature=0)).json()
    assert streamed == whole["choices"][0]["message"]["content"]


def test_completion_stream_without_usage_ends_with_done(engine_client,
                                                       tiny_model_dir: Path) -> None:
    response = engine_client().post("/v1/completions", json={
        "model": str(tiny_model_dir), "prompt": ["Hello", "Answer:"], "max_tokens": 3,
        "temperature": 0, "stream": True})
    chunks = _events(response)
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all("usage" not in c for c in chunks)
    assert sorted(c["choices"][0]["index"] for c in chunks
                  if c["choices"][0]["finish_reason"]) == [0, 1]


def test_stop_string_ends_the_text_before_it(engine_client, tiny_model_dir: Path) -> None:
    client = engine_client()
    request = {"model": str(tiny_model_dir), "prompt": "### Instruction:", "max_tokens": 24,
               "temperature": 0}
    full = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    assert len(full) > 8, full
    stop = full[5:8]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        response = client.post("/v1/completions",
                               json={**request, "stop": [stop, "never-seen"], "stream": stream})
        if stream:
            chunks = _events(response)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice = response.json()["choices"][0]
            text, finish = choice["text"], choice["finish_reason"]
        assert (text, finish) == (cut, "stop")


def test_n_choices_and_seeded_sampling_repeat(engine_client, tiny_model_dir: Path) -> None:
    client = engine_client()
    request = {"model": str(tiny_model_dir), "prompt": "Hello", "max_tokens": 12, "n": 3,
               "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first = client.post("/v1/completions", json=request).json()
    again = client.post("/v1/completions", json=request).json()
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in again["choices"]]
    assert len(set(texts)) > 1, "the n choices of one request must differ"
    other = client.post("/v1/completions", json={**request, "seed": 99}).json()
    assert [c["text"] for c in other["choices"]] != texts
    lengths = sum(c["finish_reason"] == "length" for c in first["choices"])
    assert 12 * lengths <= first["usage"]["completion_tokens"] <= 36


def test_prompt_over_max_prompt_tokens_is_context_length_exceeded(
        engine_client, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_INFERENCE_MAX_PROMPT_TOKENS", "16")
    client = engine_client()
    long_text = "Below is an instruction that describes a task. " * 4
    response = client.post("/v1/completions", json={"model": str(tiny_model_dir),
                                                     "prompt": long_text})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "prompt"
    response = client.post("/v1/chat/completions", json={
        "model": str(tiny_model_dir), "messages": [{"role": "user", "content": long_text}]})
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (
        "context_length_exceeded", "messages")


def test_unknown_adapter_and_refused_base_are_model_not_found(
        engine_client, tmp_path: Path) -> None:
    client = engine_client()
    for model in ("tunery-job-0123abcd-0000-4000-8000-000000000000", "/etc",
                  str(tmp_path / "no-such-model")):
        response = client.post("/v1/chat/completions", json=_chat(model))
        assert response.status_code == 404, (model, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")


def test_bad_values_are_400_naming_the_param(engine_client, tiny_model_dir: Path) -> None:
    client = engine_client()
    limits = get_settings().inference
    cases = [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": limits.max_tokens + 1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": limits.max_n + 1}, "n"),
        ({"stop": ["x"] * 100}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
    ]
    for extra, param in cases:
        response = client.post("/v1/chat/completions",
                               json={**_chat(str(tiny_model_dir)), **extra})
        assert response.status_code == 400, (extra, response.text)
        assert response.json()["error"]["param"] == param, (extra, response.json())
    # Within max_tokens but beyond the tiny model's 512 positions.
    too_long = client.post("/v1/chat/completions", json={**_chat(str(tiny_model_dir)),
                                                         "max_completion_tokens": 510})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "max_completion_tokens"
    response = client.post("/v1/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_chat_on_a_base_without_chat_template_points_to_completions(
        engine_client, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    plain = tmp_path / "no-template"
    plain.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name not in ("tokenizer_config.json", "chat_template.jinja"):
            (plain / item.name).symlink_to(item)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    client = engine_client()
    response = client.post("/v1/chat/completions", json=_chat(str(plain)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and "/v1/completions" in error["message"]
    assert client.post("/v1/completions", json={"model": str(plain), "prompt": "Hi",
                                                "max_tokens": 2}).status_code == 200


def _loaded(client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]
            if m["id"].startswith("tunery-job-")]


def test_adapters_beyond_max_adapters_unload_least_recently_used(
        engine_client, stored_adapter: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_INFERENCE_MAX_ADAPTERS", "2")
    a, b, c = (stored_adapter(seed) for seed in (11, 12, 13))
    client = engine_client()
    for name in (a, b):
        assert client.post("/v1/chat/completions", json=_chat(name, max_tokens=1)).status_code \
            == 200
    assert _loaded(client) == [a, b]
    client.post("/v1/chat/completions", json=_chat(a, max_tokens=1))  # a is now the newest
    client.post("/v1/chat/completions", json=_chat(c, max_tokens=1))
    assert _loaded(client) == [a, c]
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert {m["parent"] for m in listing["data"] if m["id"] == c} != {None}


def test_adapters_beyond_adapter_memory_unload_least_recently_used(
        engine_client, stored_adapter: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # r 48 on every linear layer of the tiny Llama: 384 KiB of fp32 tensors; two fit in 1 MB.
    monkeypatch.setenv("TUNERY_INFERENCE_ADAPTER_MEMORY_MB", "1")
    a, b, c = (stored_adapter(seed, r=48) for seed in (21, 22, 23))
    client = engine_client()
    for name in (a, b, c):
        assert client.post("/v1/chat/completions", json=_chat(name, max_tokens=1)).status_code \
            == 200
    assert _loaded(client) == [b, c]
    engine = client.app.state.engine
    assert 0 < engine.store.adapter_bytes() <= 1024 * 1024


def test_engine_token_guards_every_route_but_health(
        engine_client, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_INFERENCE_ENGINE_TOKEN", "s3cret")
    client = engine_client()
    assert client.get("/health").status_code == 200
    request = {"model": str(tiny_model_dir), "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", request)):
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (headers, path)
            assert response.json()["error"]["code"] == "invalid_api_key"
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/completions", json=request, headers=ok).status_code == 200
    assert client.get("/v1/models", headers=ok).status_code == 200
    # Nor does the engine describe itself to whoever asks.
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path


def test_bases_beyond_max_bases_unload_least_recently_used(
        engine_client, tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model_dir, other)
    client = engine_client()  # max_bases is 1 by default
    request = {"prompt": "Hi", "max_tokens": 2}
    for model in (str(tiny_model_dir), str(other)):
        assert client.post("/v1/completions", json={**request, "model": model}).status_code \
            == 200
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [str(other)]
