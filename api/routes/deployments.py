"""`/v1/deployments/{id}`: a deployment's endpoint, an OpenAI base URL.

`OpenAI(base_url=<the deployment's URL>, api_key=<a key of its tenant>)` reaches
`chat.completions.create` here: whatever `model` the request names, the deployment's adapter
answers, through the same engine path as `/v1/chat/completions` (`api.routes.completions`),
and the answer carries the name the caller used. Errors take OpenAI's shape
(`api.errors.OPENAI_PATHS`); a terminated deployment is a 410 `deployment_terminated`,
another tenant's or an unknown one a 404.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import OPENAI_AUTHENTICATED, ApiError, openai_error_responses
from api.inference.requests import DEFAULT_MAX_TOKENS, ChatCompletionCreate
from api.inference.served import ServedModel, organization
from api.routes.completions import answer
from api.session_route import SessionRoute
from shared import deployments, jobs
from shared.served_models import adapter_name
from shared.settings import Settings
from shared.tenancy import Scope

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/deployments", tags=["openai: deployments"],
                   responses=OPENAI_AUTHENTICATED)

log = logging.getLogger("tunery.api.deployments")

DeploymentId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]


@router.post("/{deployment_id}/chat/completions",
             summary="OpenAI chat completion with the deployment's adapter (any `model`)",
             responses=openai_error_responses(404, 410, 422, 502), response_model=None)
async def deployment_chat_completion(
    deployment_id: DeploymentId, body: ChatCompletionCreate, caller: TenantDep,
    session: SessionDep, settings: SettingsDep,
) -> JSONResponse | StreamingResponse:
    served, body = await run_in_threadpool(_resolve, session, caller.scope, deployment_id,
                                           body, settings)
    response = await answer(settings, served, "/v1/chat/completions", body)
    # Counted once the engine has accepted the request (a stream: once it started).
    await run_in_threadpool(_count, session, deployment_id)
    return response


def _resolve(session: Session, scope: Scope, deployment_id: str, body: ChatCompletionCreate,
             settings: Settings) -> tuple[ServedModel, ChatCompletionCreate]:
    """The deployment's adapter as the model to serve, and the body within its context length.
    The connection goes back to the pool before the engine is asked, as for /v1/chat."""
    try:
        deployment = deployments.live_deployment(session, scope, deployment_id)
        job = jobs.get_job(session, scope, deployment.job_id)
        served = ServedModel(name=body.model, base=deployment.base_model,
                             engine_model=adapter_name(job.id), job_id=job.id,
                             owner=organization(session, job))
        return served, _within(body, deployment.max_model_len, settings)
    finally:
        session.close()


def _within(body: ChatCompletionCreate, max_model_len: int | None,
            settings: Settings) -> ChatCompletionCreate:
    """`body` held to the deployment's max_model_len: more tokens asked is a 422 naming the
    field; none asked gets the usual default, cut to fit."""
    if max_model_len is None:
        return body
    asked = body.asked_max_tokens()
    if asked is None:
        default = min(DEFAULT_MAX_TOKENS, settings.inference.max_tokens, max_model_len)
        return body.model_copy(update={"max_tokens": default})
    if asked > max_model_len:
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        message = (f"{field}: at most {max_model_len} on this deployment (its max_model_len), "
                   f"got {asked}")
        raise ApiError(422, "invalid_request", message, [{"path": field, "message": message}])
    return body


def _count(session: Session, deployment_id: str) -> None:
    # The engine has answered: a database fault now costs the count, never the answer.
    try:
        deployments.record_request(session, deployment_id)
        session.commit()
    except SQLAlchemyError as exc:
        log.warning("could not count a request of deployment %s: %s", deployment_id, exc)
    finally:
        session.close()
