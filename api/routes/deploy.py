"""`/v1/deploy/*`: the routes the official `monsterapi` client uses to follow and terminate
jobs (`get_deployment_status`, `get_deployment_logs`, `get_list_of_deployments`,
`terminate_deployment`), served over fine-tuning jobs so that client works unchanged."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from api.deps import SessionDep, TenantDep
from api.errors import AUTHENTICATED, error_responses
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
from api.schemas import JobList, JobOut, LogsOut, TerminateIn

router = APIRouter(prefix="/v1/deploy", tags=["monsterapi compatibility"],
                   responses=AUTHENTICATED)


@router.get("/status/{deployment_id}", summary="Alias of GET /v1/finetune/llm/{job_id}",
            responses=error_responses(404))
def deployment_status(deployment_id: JobId, caller: TenantDep, session: SessionDep) -> JobOut:
    return get_job(deployment_id, caller, session)


@router.get("/logs/{deployment_id}", summary="Alias of GET /v1/finetune/llm/{job_id}/logs",
            responses=error_responses(404))
def deployment_logs(deployment_id: JobId, caller: TenantDep, session: SessionDep,
                    n_lines: NLines = 100, after: AfterLine = None) -> LogsOut:
    return job_logs(deployment_id, caller, session, n_lines, after)


class DeploymentListQuery(JobListQuery):
    limit: int = Field(100, ge=1, le=100)


@router.get("/list", summary="Alias of GET /v1/finetune/llm")
def deployment_list(caller: TenantDep, session: SessionDep,
                    query: Annotated[DeploymentListQuery, Query()]) -> JobList:
    return list_jobs(caller, session, query)


@router.post("/terminate", summary="Alias of POST /v1/finetune/llm/{job_id}/cancel",
             responses=error_responses(404, 409, 413))
def terminate_deployment(body: TerminateIn, caller: TenantDep, session: SessionDep) -> JobOut:
    return cancel_job(body.deployment_id, caller, session)
