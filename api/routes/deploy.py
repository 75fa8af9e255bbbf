"""`/v1/deploy/*`: MonsterAPI's deploy routes, as the official `monsterapi` client calls them.

`POST /v1/deploy/llm` deploys a completed job's adapter (`shared.deployments`). The client
also follows and terminates fine-tuning jobs through `status`, `logs`, `list` and
`terminate`, so those routes serve both: an id starting with `dep-` is a deployment, any
other id a job, answered exactly as the `/v1/finetune/llm` routes answer it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import Field
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import AUTHENTICATED, error_responses
from api.inference.served import ModelNotFound, resolve_model
from api.openai import ids
from api.routes.finetune import (
    AfterLine,
    JobId,
    JobListQuery,
    NLines,
    cancel_job,
    get_job,
    job_logs,
    list_jobs,
)
from api.schemas import (
    DeployList,
    DeploymentLogsOut,
    DeploymentOut,
    JobOut,
    LogsOut,
    TerminateIn,
)
from api.session_route import SessionRoute
from shared import deployments
from shared.deploy_schema import DeployRequest
from shared.models import Deployment
from shared.settings import Settings

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/deploy", tags=["monsterapi compatibility"],
                   responses=AUTHENTICATED)


def _view(deployment: Deployment, request: Request) -> DeploymentOut:
    return DeploymentOut.of(deployment, str(request.base_url))


@router.post("/llm", status_code=201, responses=error_responses(404, 409, 413),
             summary="Deploy a COMPLETED job's adapter behind an OpenAI-compatible endpoint "
                     "(MonsterAPI's payload; loramodel_path names the job)")
def deploy_llm(body: DeployRequest, request: Request, caller: TenantDep, session: SessionDep,
               settings: SettingsDep) -> DeploymentOut:
    job_id = _adapter_job_id(session, caller.tenant_id, body.loramodel_path, settings)
    deployment = deployments.create_deployment(session, caller.tenant_id, body, job_id,
                                               settings.openai.model_aliases)
    session.commit()
    return _view(deployment, request)


def _adapter_job_id(session: Session, tenant_id: str, loramodel_path: str | None,
                    settings: Settings) -> str:
    """The job a deploy payload's `loramodel_path` names: its id, bare or `ftjob-…`, or its
    `fine_tuned_model` name (`ft:…`) as the OpenAI dialect shows it."""
    value = (loramodel_path or "").strip()
    if not value:
        raise deployments.DeploymentRefused(
            422, "loramodel_path", "loramodel_path is required: name the id of a COMPLETED "
            "fine-tuning job of yours; this server deploys fine-tuned adapters, not bare base "
            "models")
    if value.startswith("ft:"):
        try:
            served = resolve_model(session, tenant_id, value, settings)
        except ModelNotFound as exc:
            raise deployments.DeploymentRefused(404, "loramodel_path", str(exc)) from None
        if served.job_id is not None:
            return served.job_id
    job_id = ids.job_id_of(value)
    if not ids.is_job_uuid(job_id):
        raise deployments.DeploymentRefused(
            422, "loramodel_path", f"{value[:200]!r} is not a Tunery job id: only the adapters "
            "of this server's own fine-tuning jobs can be deployed here (a job id as POST "
            "/v1/finetune/llm returned it); hub ids and URLs cannot, no model hub is reachable")
    return job_id


@router.get("/status/{deployment_id}",
            summary="A deployment's state and endpoint URL (`dep-…` id), or a job's status as "
                    "GET /v1/finetune/llm/{job_id} answers it (any other id)",
            responses=error_responses(404))
def deployment_status(deployment_id: JobId, request: Request, caller: TenantDep,
                      session: SessionDep) -> DeploymentOut | JobOut:
    if deployments.is_deployment_id(deployment_id):
        return _view(deployments.get_deployment(session, caller.scope, deployment_id), request)
    return get_job(deployment_id, caller, session)


@router.get("/logs/{deployment_id}",
            summary="A deployment's log lines (`dep-…` id), or a job's as "
                    "GET /v1/finetune/llm/{job_id}/logs answers them (any other id)",
            responses=error_responses(404))
def deployment_logs(deployment_id: JobId, caller: TenantDep, session: SessionDep,
                    n_lines: NLines = 100,
                    after: AfterLine = None) -> DeploymentLogsOut | LogsOut:
    if not deployments.is_deployment_id(deployment_id):
        return job_logs(deployment_id, caller, session, n_lines, after)
    deployment = deployments.get_deployment(session, caller.scope, deployment_id)
    rows = (deployments.tail_events(session, deployment.id, n_lines) if after is None
            else deployments.events_after(session, deployment.id, after, n_lines))
    return DeploymentLogsOut.of(deployment, rows, after)


class DeploymentListQuery(JobListQuery):
    limit: int = Field(100, ge=1, le=100)


@router.get("/list", summary="This key's jobs (`items`, as GET /v1/finetune/llm lists them) "
                             "and deployments (`deployments`), newest first")
def deployment_list(request: Request, caller: TenantDep, session: SessionDep,
                    query: Annotated[DeploymentListQuery, Query()]) -> DeployList:
    jobs = list_jobs(caller, session, query)
    found, total = deployments.list_deployments(session, caller.scope, query.limit,
                                                query.offset)
    return DeployList(**dict(jobs), deployments=[_view(d, request) for d in found],
                      deployments_total=total)


@router.post("/terminate",
             summary="Terminate a deployment (`dep-…` id; again: the same answer), or cancel a "
                     "job as POST /v1/finetune/llm/{job_id}/cancel does (any other id)",
             responses=error_responses(404, 409, 413))
def terminate_deployment(body: TerminateIn, request: Request, caller: TenantDep,
                         session: SessionDep) -> DeploymentOut | JobOut:
    if not deployments.is_deployment_id(body.deployment_id):
        return cancel_job(body.deployment_id, caller, session)
    deployment = deployments.terminate_deployment(session, caller.scope, body.deployment_id)
    session.commit()
    return _view(deployment, request)
