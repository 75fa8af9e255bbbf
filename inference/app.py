"""The engine's HTTP routes: OpenAI's chat and completion endpoints as vLLM serves them, the
list of loaded models, and a health probe. Every error is OpenAI's envelope."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from inference.batcher import Engine
from inference.events import Accepted, Channel, Delta, Finished, Refused, Submission
from inference.protocol import (
    ChatRequest,
    CompletionRequest,
    FinishReason,
    RequestRefused,
    chat_chunk,
    chat_completion,
    check_limits,
    completion_chunk,
    model_list,
    new_id,
    now,
    text_completion,
    usage_chunk,
)
from inference.sampling import SamplingParams
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The engine's app. Without `engine` it builds one from `settings` (default: the
    process's) and runs it for the app's lifetime."""
    settings = settings if settings is not None else get_settings()
    owned = engine is None
    running = engine if engine is not None else Engine(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned:
            running.start()
        try:
            yield
        finally:
            if owned:
                running.stop()

    # No /docs or /openapi.json: only /health answers without the engine's token.
    app = FastAPI(title="Tunery inference engine", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.engine = running
    app.state.settings = settings
    _add_error_handlers(app)

    token = settings.inference.engine_token

    def authorized(request: Request) -> None:
        if token is None:
            return
        sent = request.headers.get("authorization", "")
        scheme, _, value = sent.partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                 expected):
            raise RequestRefused(401, "a valid bearer token is required",
                                 code="invalid_api_key", type_="authentication_error")

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health() -> JSONResponse:
        load = {"running_rows": running.running_rows, "waiting_rows": running.waiting_rows,
                "decoded_tokens": running.decoded_tokens}
        if running.alive:
            return JSONResponse({"status": "ok", **load})
        return JSONResponse({"status": "engine thread stopped", **load}, status_code=503)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        loaded = running.models()
        listing = model_list([name for name, _ in loaded])
        # As vLLM lists a LoRA adapter: its base as `parent` and `root`.
        for entry, (_, parent) in zip(listing["data"], loaded, strict=True):
            entry["root"] = parent or entry["id"]
            entry["parent"] = parent
        return listing

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest) -> Any:
        check_limits(body, settings.inference)
        submission = _submission(body, "chat", [body.messages], body.tools,
                                 body.requested_max_tokens())
        if body.max_completion_tokens is not None:
            submission.max_tokens_param = "max_completion_tokens"
        return await _answer(running, body, submission)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest) -> Any:
        check_limits(body, settings.inference)
        submission = _submission(body, "completion", body.prompts(), None, body.max_tokens)
        return await _answer(running, body, submission)

    return app

def _submission(body: ChatRequest | CompletionRequest, kind: Literal["chat", "completion"],
                prompts: list[Any],
                tools: list[dict[str, Any]] | None, max_tokens: int | None) -> Submission:
    return Submission(
        kind=kind, model=body.model, prompts=prompts, tools=tools, n=body.n,
        max_tokens=max_tokens,
        sampling=SamplingParams(body.temperature, body.top_p, body.seed),
        stop=body.stop_strings(), channel=Channel(asyncio.get_running_loop()),
    )

async def _answer(engine: Engine, body: ChatRequest | CompletionRequest,
                  submission: Submission) -> Any:
    channel = submission.channel
    engine.submit(submission)
    try:
        first = await channel.receive()
    except BaseException:
        channel.cancel()
        raise
    if isinstance(first, Refused):
        return _error_response(first.error)
    assert isinstance(first, Accepted)
    choices = len(submission.prompts) * submission.n
    if body.stream:
        return StreamingResponse(_stream(body, submission, choices, first.prompt_tokens),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    texts = [""] * choices
    finishes: list[FinishReason] = ["stop"] * choices
    completion_tokens, left = 0, choices
    try:
        while left:
            event = await channel.receive()
            if isinstance(event, Delta):
                texts[event.index] += event.text
            elif isinstance(event, Finished):
                finishes[event.index] = event.reason
                completion_tokens += event.completion_tokens
                left -= 1
            elif isinstance(event, Refused):
                return _error_response(event.error)
    finally:
        channel.cancel()  # a client gone mid-request frees its rows; a no-op after the end
    build = chat_completion if submission.kind == "chat" else text_completion
    return build(new_id(submission.kind), now(), body.model, texts, finishes,
                 first.prompt_tokens, completion_tokens)

async def _stream(body: ChatRequest | CompletionRequest, submission: Submission,
                  choices: int, prompt_tokens: int) -> AsyncIterator[str]:
    channel = submission.channel
    id_, created, model = new_id(submission.kind), now(), body.model
    with_usage = body.include_usage
    chat = submission.kind == "chat"

    def chunk(index: int, text: str | None, finish: FinishReason | None,
              role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            data = chat_chunk(id_, created, model, index, delta, finish, with_usage)
        else:
            data = completion_chunk(id_, created, model, index, text or "", finish, with_usage)
        return _sse(data)

    completion_tokens, left = 0, choices
    try:
        if chat:
            for index in range(choices):
                yield chunk(index, None, None, role=True)
        while left:
            event = await channel.receive()
            if isinstance(event, Delta):
                yield chunk(event.index, event.text, None)
            elif isinstance(event, Finished):
                completion_tokens += event.completion_tokens
                left -= 1
                yield chunk(event.index, None, event.reason)
            elif isinstance(event, Refused):
                yield _sse(event.error.body())
                break
        else:
            if with_usage:
                object_ = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(usage_chunk(id_, created, model, object_, prompt_tokens,
                                       completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        channel.cancel()

def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

def _error_response(error: RequestRefused) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)

def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestRefused)
    async def refused(_: Request, exc: RequestRefused) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc)
        if first.get("type") == "json_invalid" or not loc:
            message = "the request body must be a JSON object: " + str(first.get("msg", ""))
        else:
            message = f"{where}: {first.get('msg', 'invalid value')}"
        return _error_response(RequestRefused(400, message, param=param, code="invalid_value"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(RequestRefused(500, "the engine failed to answer",
                                              type_="internal_error"))
