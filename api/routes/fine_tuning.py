"""OpenAI's `/v1/fine_tuning/jobs`: create, list, read, cancel, pause and resume jobs, and
read their events and checkpoints. Every job is a Tunery job: the MonsterAPI dialect reads
and acts on the same ones (`ftjob-{id}` there is `{id}`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import OPENAI_AUTHENTICATED, ApiError, openai_error_responses
from api.feed_stream import (
    LastEventIdHeader,
    event_stream,
    follow_feed,
    resume_cursor,
    sse_response,
)
from api.limits.active_jobs import check_active_jobs
from api.openai import checkpoints as checkpoint_views
from api.openai import ids
from api.openai.events import StreamedEvents, UnknownCursor, list_events
from api.openai.job_create import create_openai_job
from api.openai.job_view import job_object, name_segment
from api.openai.schemas import (
    METADATA_KEY,
    METADATA_KEY_RULE,
    CheckpointList,
    EventList,
    FineTuningJob,
    JobCreate,
    JobList,
)
from api.session_route import SessionRoute
from shared import jobs
from shared.artifacts import stream_archive
from shared.models import Job, JobStatus, Tenant
from shared.queue import enqueue_training
from shared.tenancy import CursorNotFound

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/fine_tuning/jobs", tags=["openai: fine-tuning"],
                   responses=OPENAI_AUTHENTICATED)

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=96)]


def _organization(session: Session, job: Job) -> str:
    tenant = session.get(Tenant, job.tenant_id)
    return tenant.name if tenant is not None else job.tenant_id


def _view(session: Session, job: Job) -> FineTuningJob:
    eta_s = eta_at = None
    if job.status == JobStatus.RUNNING.value:
        latest = jobs.latest_metric(session, job.id, "eta_s")
        if latest is not None:
            eta_s, eta_at = latest.values["eta_s"], latest.at
    return job_object(job, _organization(session, job), eta_s=eta_s, eta_at=eta_at)


def _job(session: Session, caller: Any, job_id: str) -> Job:
    return jobs.get_job(session, caller.scope, ids.job_id_of(job_id))


@router.post("", summary="Create a fine-tuning job (supervised or DPO) from uploaded files",
             responses=openai_error_responses(404, 429))
def create_job(body: JobCreate, caller: TenantDep, session: SessionDep, settings: SettingsDep,
               storage: StorageDep) -> FineTuningJob:
    created = create_openai_job(session, storage, settings, caller.tenant_id, body)
    if created.queued:
        check_active_jobs(session, created.job, settings.limits.max_active_jobs_per_tenant)
    session.commit()
    if created.queued:
        enqueue_training(created.job.id, created.job.device_class)
    return _view(session, jobs.get_job(session, caller.scope, created.job.id))


@router.get("", summary="This key's jobs, newest first; `metadata[key]=value` filters")
def list_jobs(request: Request, caller: TenantDep, session: SessionDep, after: After = None,
              limit: Limit = 20) -> JobList:
    metadata = _metadata_filter(request)
    try:
        rows, more = jobs.jobs_after(session, caller.scope,
                                     ids.job_id_of(after) if after else None, limit,
                                     metadata=metadata)
    except CursorNotFound:
        raise _bad_cursor(f"no job with id {after}") from None
    return JobList(data=[_view(session, job) for job in rows], has_more=more)


def _metadata_filter(request: Request) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in ("after", "limit"):
            continue
        if not (name.startswith("metadata[") and name.endswith("]") and len(name) > 10):
            message = f"unknown query parameter {name!r}; use after, limit or metadata[key]"
            raise ApiError(422, "invalid_request", message, [{"path": name, "message": message}])
        key = name[len("metadata["):-1]
        if not METADATA_KEY.fullmatch(key) or len(value) > 512 or "\x00" in value:
            message = (f"a metadata key is {METADATA_KEY_RULE}, a value at most 512 "
                       "characters without NUL")
            raise ApiError(422, "invalid_request", f"metadata: {message}",
                           [{"path": "metadata", "message": message}])
        pairs[key] = value
    return pairs


def _bad_cursor(message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"after: {message}",
                    [{"path": "after", "message": message}])


@router.get("/{job_id}", summary="A job", responses=openai_error_responses(404))
def get_job(job_id: JobId, caller: TenantDep, session: SessionDep) -> FineTuningJob:
    return _view(session, _job(session, caller, job_id))


@router.post("/{job_id}/cancel", summary="Cancel a queued, running or paused job",
             responses=openai_error_responses(404, 409))
def cancel_job(job_id: JobId, caller: TenantDep, session: SessionDep) -> FineTuningJob:
    job = jobs.request_cancel(session, caller.scope, ids.job_id_of(job_id))
    session.commit()
    return _view(session, job)


StreamEvents = Annotated[bool, Query(
    description="true: the job's events oldest first as server-sent events, each "
    "`data: {event}`, live until the job ends, then `data: [DONE]`; resumable with "
    "Last-Event-ID. `after` and `limit` are for the list only.")]


@router.get("/{job_id}/events", summary="A job's events, newest first; or live with stream=true",
            response_model=EventList,
            responses={**sse_response("The events, newest first (application/json); with "
                                      "stream=true, live and oldest first (text/event-stream)",
                                      data="A `fine_tuning.job.event` as JSON on one line; "
                                           "`[DONE]` after the last."),
                       **openai_error_responses(404)})
def job_events(job_id: JobId, caller: TenantDep, session: SessionDep, settings: SettingsDep,
               after: After = None, limit: Limit = 20, stream: StreamEvents = False,
               last_event_id: LastEventIdHeader = None) -> EventList | StreamingResponse:
    job = _job(session, caller, job_id)
    if stream:
        if after is not None:
            raise _bad_cursor("not with stream=true: a stream starts with the job's first "
                              "event and resumes with Last-Event-ID")
        cursor = resume_cursor(last_event_id, None)
        render = StreamedEvents(_organization(session, job))
        # As for /v1/finetune/llm/{id}/stream: the request's connection goes back now.
        session.close()
        return event_stream(follow_feed(caller.scope, job.id, cursor, render, settings.stream),
                            caller.key_id, settings.stream)
    key = None
    if after is not None:
        key = ids.event_key(after)
        if key is None:
            raise _bad_cursor(f"no event with id {after}")
    organization = _organization(session, job)
    try:
        events, more = list_events(
            session, job, after=key, limit=limit,
            model_name=lambda: job_object(job, organization).fine_tuned_model or "")
    except UnknownCursor:
        raise _bad_cursor(f"no event with id {after}") from None
    return EventList(data=events, has_more=more)


@router.get("/{job_id}/checkpoints", summary="A job's checkpoints, newest first",
            responses=openai_error_responses(404))
def job_checkpoints(job_id: JobId, caller: TenantDep, session: SessionDep,
                    storage: StorageDep, after: After = None, limit: Limit = 10
                    ) -> CheckpointList:
    job = _job(session, caller, job_id)
    listed = checkpoint_views.list_checkpoints(session, storage, job,
                                               name_segment(_organization(session, job)))
    if after is not None:
        step = ids.checkpoint_step(after, job.id)
        if step is None or all(c.step_number != step for c in listed):
            raise _bad_cursor(f"no checkpoint with id {after}")
        listed = [c for c in listed if c.step_number < step]
    page = listed[:limit]
    return CheckpointList(data=page, first_id=page[0].id if page else None,
                          last_id=page[-1].id if page else None, has_more=len(listed) > limit)


@router.get("/{job_id}/checkpoints/{checkpoint_id}/archive", response_class=StreamingResponse,
            summary="Tunery extension: download a checkpoint's adapter as one tar.gz",
            responses={200: {"content": {"application/gzip": {}}}, **openai_error_responses(404)})
def checkpoint_archive(job_id: JobId, checkpoint_id: Annotated[str, Path(max_length=96)],
                       caller: TenantDep, session: SessionDep,
                       storage: StorageDep) -> StreamingResponse:
    job = _job(session, caller, job_id)
    step = ids.checkpoint_step(checkpoint_id, job.id)
    found = checkpoint_views.adapter_files(storage, job.id, step) if step else []
    if not found:
        raise ApiError(404, "not_found", f"no checkpoint with id {checkpoint_id}")
    name = f"{ids.openai_job_id(job.id)}-step-{step}"
    return StreamingResponse(
        stream_archive(storage, found, folder=name), media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})


@router.post("/{job_id}/pause", summary="Pause a job: it saves a checkpoint and frees its worker",
             responses=openai_error_responses(404, 409))
def pause_job(job_id: JobId, caller: TenantDep, session: SessionDep) -> FineTuningJob:
    job = jobs.request_pause(session, caller.scope, ids.job_id_of(job_id))
    session.commit()
    return _view(session, job)


@router.post("/{job_id}/resume", summary="Resume a paused job from its checkpoint",
             responses=openai_error_responses(404, 409))
def resume_job(job_id: JobId, caller: TenantDep, session: SessionDep) -> FineTuningJob:
    job = jobs.resume_job(session, caller.scope, ids.job_id_of(job_id))
    session.commit()
    if job.status == JobStatus.QUEUED.value:
        enqueue_training(job.id, job.device_class)
    return _view(session, job)
