"""The OpenAI request bodies the engine accepts and the objects it answers with, as vLLM's
OpenAI-compatible server speaks them.

Unknown request fields are ignored, as vLLM ignores them: the API forwards what tenants send.
Limits that depend on the operator (`max_tokens`, `n`) are checked by `check_limits`, so the
models stay plain.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.settings import InferenceSettings

# OpenAI allows up to 4 stop sequences; vLLM more. A bound keeps the matching cheap.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        """`stop` as a list without empty strings; ValueError when there are too many or
        one is too long."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        stops = [s for s in stops if s]
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most "
                             f"{MAX_STOP_CHARS} characters")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingFields):
    """`POST /v1/chat/completions`. Messages are checked when they are rendered."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: one prompt or several, each answered with `n` choices."""

    prompt: str | list[str]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class RequestRefused(Exception):
    """A request the engine answers with an OpenAI error envelope instead of a result."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type_)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_value(param: str, message: str) -> RequestRefused:
    return RequestRefused(400, message, param=param, code="invalid_value")


def model_not_found(model: str, why: str) -> RequestRefused:
    return RequestRefused(404, f"The model {model!r} does not exist or cannot be loaded: {why}",
                          param="model", code="model_not_found")


def check_limits(request: ChatRequest | CompletionRequest, limits: InferenceSettings) -> None:
    """`RequestRefused` naming the field when the request asks more than the operator allows."""
    asked = request.requested_max_tokens()
    if asked is not None and asked > limits.max_tokens:
        param = "max_completion_tokens" if isinstance(request, ChatRequest) \
            and request.max_completion_tokens is not None else "max_tokens"
        raise bad_value(param, f"{param} must be at most {limits.max_tokens}, got {asked}")
    if request.n > limits.max_n:
        raise bad_value("n", f"n must be at most {limits.max_n}, got {request.n}")
    if isinstance(request, CompletionRequest):
        prompts = request.prompts()
        if not prompts:
            raise bad_value("prompt", "prompt must be a string or a non-empty list of strings")
        if len(prompts) * request.n > limits.max_batch_size * limits.max_n:
            raise bad_value("prompt", "too many prompts times n in one request")
    try:
        request.stop_strings()
    except ValueError as exc:
        raise bad_value("stop", str(exc)) from None


FinishReason = Literal["stop", "length"]


def new_id(kind: Literal["chat", "completion"]) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id_: str, created: int, model: str, texts: list[str],
                    finishes: list[FinishReason], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {
        "id": id_, "object": "chat.completion", "created": created, "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text},
             "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(zip(texts, finishes, strict=True))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def text_completion(id_: str, created: int, model: str, texts: list[str],
                    finishes: list[FinishReason], prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {
        "id": id_, "object": "text_completion", "created": created, "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(zip(texts, finishes, strict=True))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def chat_chunk(id_: str, created: int, model: str, index: int, delta: dict[str, Any],
               finish: FinishReason | None, with_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None,
                     "finish_reason": finish}],
        "system_fingerprint": None,
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk(id_: str, created: int, model: str, index: int, text: str,
                     finish: FinishReason | None, with_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": id_, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
        "system_fingerprint": None,
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(id_: str, created: int, model: str, object_: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk before `[DONE]` when `stream_options.include_usage`: no choices."""
    return {"id": id_, "object": object_, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def model_list(names: list[str], owned_by: str = "tunery") -> dict[str, Any]:
    created = now()
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": owned_by}
        for name in names
    ]}
