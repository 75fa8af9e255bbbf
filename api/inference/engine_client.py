"""Forward a request to the engine serving a model's base, and its answer back.

Engines (the embedded one, vLLM) speak OpenAI's protocol under the engine's names for models
(`shared.served_models`); the caller sees the name it used, in answers, stream chunks and
error messages alike. An engine that cannot be reached, refuses the API's token or breaks is
the operator's problem, answered 503 / 502 without its address; an engine's 4xx is the
caller's, passed on with its message and parameter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

from api.errors import ApiError
from api.inference.served import ServedModel
from shared.settings import Settings

log = logging.getLogger("tunery.api.inference")

# An engine's error body is read, at most this much, to pass its message on.
_MAX_ERROR_BYTES = 64 * 1024
_SSE_DATA = b"data: "
_BROKEN_STREAM = _SSE_DATA + json.dumps({"error": {
    "message": "the inference engine stopped before the answer was complete; retry",
    "type": "server_error", "param": None, "code": "engine_error"}}).encode() + b"\n\n"


def engine_url(settings: Settings, base: str) -> str:
    """The engine serving `base`: its own entry in `inference.engines`, else the default."""
    return settings.inference.engines.get(base, settings.inference.engine_url).rstrip("/")


def _headers(settings: Settings) -> dict[str, str]:
    token = settings.inference.engine_token
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}


def _client(settings: Settings) -> httpx.AsyncClient:
    # Engines are private services the operator configured: no proxy from the environment.
    return httpx.AsyncClient(timeout=httpx.Timeout(settings.inference.timeout_s, connect=5.0),
                             trust_env=False)


async def complete(settings: Settings, served: ServedModel, route: str,
                   body: dict[str, Any]) -> JSONResponse:
    """A non-streamed answer from the engine, in the caller's names."""
    url = engine_url(settings, served.base) + route
    async with _client(settings) as client:
        try:
            response = await client.post(url, json=body, headers=_headers(settings))
        except httpx.HTTPError as exc:
            raise _unreachable(served, url, exc) from None
        if response.status_code != 200:
            raise _engine_error(served, url, response.status_code, response.content)
        try:
            answer = response.json()
        except ValueError:
            raise _broken(served, url, "an answer that is not JSON") from None
    if isinstance(answer, dict):
        answer["model"] = served.name
    return JSONResponse(answer)


async def stream(settings: Settings, served: ServedModel, route: str,
                 body: dict[str, Any]) -> StreamingResponse:
    """A streamed answer: the engine's server-sent events, passed on as they come, each chunk
    in the caller's names. Errors before the first byte are answered as errors; the engine's
    connection closes with the caller's."""
    url = engine_url(settings, served.base) + route
    client = _client(settings)
    request = client.build_request("POST", url, json=body, headers=_headers(settings))
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        raise _unreachable(served, url, exc) from None
    if response.status_code != 200:
        content = await _read_bounded(response)
        await response.aclose()
        await client.aclose()
        raise _engine_error(served, url, response.status_code, content)

    async def events() -> AsyncIterator[bytes]:
        finished = False
        try:
            async for line in response.aiter_lines():
                finished = finished or line == "data: [DONE]"
                yield _renamed_event(line.encode(), served.name) + b"\n"
        except httpx.HTTPError as exc:
            log.warning("engine stream for %s broke off: %s", served.engine_model, exc)
        finally:
            await response.aclose()
            await client.aclose()
        if not finished:
            # An answer cut short must not read as a complete one: OpenAI's clients raise on
            # an error event, and there is no [DONE] after it.
            yield _BROKEN_STREAM

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _renamed_event(line: bytes, name: str) -> bytes:
    if not line.startswith(_SSE_DATA) or line == b"data: [DONE]":
        return line
    try:
        chunk = json.loads(line[len(_SSE_DATA):])
    except ValueError:
        return line
    if isinstance(chunk, dict) and "model" in chunk:
        chunk["model"] = name
    return _SSE_DATA + json.dumps(chunk, separators=(",", ":")).encode()


async def _read_bounded(response: httpx.Response) -> bytes:
    content = b""
    async for chunk in response.aiter_bytes():
        content += chunk
        if len(content) >= _MAX_ERROR_BYTES:
            break
    return content[:_MAX_ERROR_BYTES]


def _unreachable(served: ServedModel, url: str, exc: Exception) -> ApiError:
    log.warning("engine for %s at %s unreachable: %s: %s", served.base, url,
                type(exc).__name__, exc)
    return ApiError(503, "engine_unavailable",
                    f"the inference engine serving {served.base} is not answering; retry "
                    "later", headers={"Retry-After": "5"})


def _broken(served: ServedModel, url: str, what: str) -> ApiError:
    log.error("engine for %s at %s sent %s", served.base, url, what)
    return ApiError(502, "engine_error",
                    f"the inference engine serving {served.base} failed to answer")


def _engine_error(served: ServedModel, url: str, status: int, content: bytes) -> ApiError:
    """The engine's refusal as the caller's error: a 4xx about the request keeps its message
    and parameter; anything else is the operator's."""
    if status in (401, 403):
        log.error("engine for %s at %s refused the API's token (%s): check "
                  "TUNERY_INFERENCE_ENGINE_TOKEN", served.base, url, status)
        return ApiError(503, "engine_unavailable",
                        f"the inference engine serving {served.base} is not available")
    if status >= 500 or status not in (400, 404, 413, 422, 429):
        return _broken(served, url, f"status {status}: {content[:500]!r}")
    try:
        error = json.loads(content).get("error") or {}
        message = str(error.get("message") or "")
        param = error.get("param")
        code = str(error.get("code") or "invalid_request")
    except (ValueError, AttributeError):
        message, param, code = "", None, "invalid_request"
    message = (message or f"the engine refused the request ({status})").replace(
        served.engine_model, served.name)
    fields = [{"path": str(param), "message": message}] if param else None
    if status == 404:
        return ApiError(404, "model_not_found", message, [{"path": "model", "message": message}])
    return ApiError(400 if status != 429 else 429, code, message, fields,
                    headers={"Retry-After": "1"} if status == 429 else None)
