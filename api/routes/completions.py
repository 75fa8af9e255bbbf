"""OpenAI's `/v1/chat/completions` and `/v1/completions` over the models this server trained:
resolve the model for the caller, check the request against the server's limits, and let the
engine serving its base answer (`api.inference.engine_client`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import OPENAI_AUTHENTICATED, ApiError, openai_error_responses
from api.inference import engine_client
from api.inference.requests import (
    DEFAULT_MAX_TOKENS,
    ChatCompletionCreate,
    CompletionCreate,
    GenerationParameters,
)
from api.inference.served import ModelNotFound, ServedModel, resolve_model
from api.session_route import SessionRoute
from shared.settings import Settings

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1", tags=["openai: inference"], responses=OPENAI_AUTHENTICATED)

_ANSWERS = openai_error_responses(404, 422, 502)


@router.post("/chat/completions", summary="A chat answer from a base or fine-tuned model",
             responses=_ANSWERS, response_model=None)
async def create_chat_completion(
    body: ChatCompletionCreate, caller: TenantDep, session: SessionDep, settings: SettingsDep
) -> JSONResponse | StreamingResponse:
    served = await run_in_threadpool(_resolve, session, caller.scope, body.model, settings)
    return await answer(settings, served, "/v1/chat/completions", body)


@router.post("/completions", summary="A text completion from a base or fine-tuned model",
             responses=_ANSWERS, response_model=None)
async def create_completion(
    body: CompletionCreate, caller: TenantDep, session: SessionDep, settings: SettingsDep
) -> JSONResponse | StreamingResponse:
    served = await run_in_threadpool(_resolve, session, caller.scope, body.model, settings)
    return await answer(settings, served, "/v1/completions", body)


async def answer(settings: Settings, served: ServedModel, route: str,
                 body: ChatCompletionCreate | CompletionCreate) -> JSONResponse | StreamingResponse:
    """The engine's answer to `body` for the resolved model `served`; the one way every
    inference route (deployments too) reaches an engine."""
    engine_body = body.engine_body(served.engine_model, _max_tokens(body, settings))
    _check_limits(body, settings)
    if body.stream:
        return await engine_client.stream(settings, served, route, engine_body)
    return await engine_client.complete(settings, served, route, engine_body)


def _resolve(session: Any, scope: Any, name: str, settings: Settings) -> ServedModel:
    # The connection goes back to the pool before the engine is asked: an answer can take
    # minutes, and a slow stream must never hold a database connection.
    try:
        served = resolve_model(session, scope, name, settings)
    except ModelNotFound as exc:
        raise ApiError(404, "model_not_found", str(exc),
                       [{"path": "model", "message": str(exc)}]) from None
    finally:
        session.close()
    if served.not_served is not None:
        raise ApiError(422, "model_not_servable", served.not_served,
                       [{"path": "model", "message": served.not_served}])
    return served


def _max_tokens(body: ChatCompletionCreate | CompletionCreate, settings: Settings) -> int:
    limit = settings.inference.max_tokens
    asked = body.asked_max_tokens()
    if asked is not None and asked > limit:
        field = ("max_completion_tokens" if isinstance(body, ChatCompletionCreate)
                 and body.max_completion_tokens is not None else "max_tokens")
        message = f"{field}: at most {limit} on this server, got {asked}"
        raise ApiError(422, "invalid_request", message, [{"path": field, "message": message}])
    return asked if asked is not None else min(DEFAULT_MAX_TOKENS, limit)


def _check_limits(body: GenerationParameters, settings: Settings) -> None:
    if body.n is not None and body.n > settings.inference.max_n:
        message = f"n: at most {settings.inference.max_n} on this server, got {body.n}"
        raise ApiError(422, "invalid_request", message, [{"path": "n", "message": message}])
