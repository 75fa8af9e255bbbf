"""`/v1/finetune/llm`: submit, follow, cancel, pause, resume and download fine-tuning jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, Field, PlainValidator

from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import AUTHENTICATED, ApiError, error_responses
from api.limits.active_jobs import check_active_jobs
from api.preflight.checks import Preflight
from api.replay import replayed
from api.schemas import (
    ArtifactOut,
    ArtifactsOut,
    JobList,
    JobOut,
    JobSubmitted,
    LogsOut,
    MetricOut,
    MetricsOut,
    PreflightOut,
    job_status_named,
)
from api.session_route import SessionRoute
from shared import idempotency, job_deletion, jobs, storage_keys
from shared.artifacts import ARCHIVE, archive_folder, list_artifacts, stream_archive
from shared.models import JobStatus
from shared.queue import enqueue_training
from shared.schema import FinetuneRequest
from shared.storage import ObjectNotFound, StorageError, validate_key

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/finetune/llm", tags=["finetune"], responses=AUTHENTICATED)

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
NLines = Annotated[int, Query(ge=1, le=10000, description="How many lines: the last ones, or "
                                                           "with `after` the first ones after it.")]
AfterLine = Annotated[int | None, Query(
    ge=0, le=jobs.MAX_LOG_ID,
    description="Only lines with a higher id, oldest first: the `next_after` of the previous "
    "answer, to follow a running job without reading a line twice; 0 reads from the start.",
)]
IdempotencyKeyHeader = Annotated[str | None, Header(
    alias=idempotency.HEADER,
    description="Optional, 1 to 255 printable ASCII characters, scoped to the API key. A retry "
    "with the same key and body within TUNERY_IDEMPOTENCY_TTL_S (default 24 h) returns the "
    "first response, marked `Idempotent-Replayed: true`, and creates no second job; the same "
    "key with a different body is a 422.",
)]


FinetuneBody = Annotated[
    Any,
    # Read as it came, validated by `Preflight.parse`: pydantic alone would stop at the first
    # section that fails and say nothing of the data's columns. OpenAPI still shows the body
    # as FinetuneRequest.
    PlainValidator(lambda body: body, json_schema_input_type=FinetuneRequest),
    Body(),
]
DryRun = Annotated[bool, Query(
    description="true: run every check a submit runs, and also ask the hub whether hub models "
    "and datasets exist; answer 200 with what the job would train (PreflightOut) and create "
    "nothing. Every problem is one 422, as for a submit.",
)]


def submit_job(body: FinetuneBody, caller: TenantDep, session: SessionDep,
               settings: SettingsDep, storage: StorageDep,
               idempotency_key: IdempotencyKeyHeader = None,
               dry_run: DryRun = False) -> JobSubmitted | JSONResponse:
    preflight = Preflight(session, storage, settings, caller.tenant_id, dry_run=dry_run)
    request = preflight.parse(body)
    if dry_run:
        return JSONResponse(preflight.check(request).model_dump(mode="json"))
    keyed = idempotency.keyed_request(caller.key_id, idempotency_key, request,
                                      settings.limits.idempotency_ttl_s)
    if keyed and (earlier := keyed.earlier_response(session)):
        return replayed(earlier)
    preflight.check(request)
    job = jobs.create_job(session, caller.tenant_id, request, settings.leases.max_attempts,
                          device_class=preflight.device_class, warnings=preflight.job_warnings)
    submitted = JobSubmitted(job_id=job.id, deployment_id=job.id, status=JobStatus.QUEUED,
                             message="job queued")
    response = idempotency.StoredResponse(201, submitted.model_dump(mode="json"))
    if keyed and (earlier := keyed.record(session, response, job_id=job.id)):
        return replayed(earlier)  # a concurrent retry won; this job was rolled back
    # Last before the commit: the tenant is locked from this count to the commit only.
    check_active_jobs(session, job, settings.limits.max_active_jobs_per_tenant)
    session.commit()
    # After the commit: a worker that wakes up must find the row. Replays send nothing.
    enqueue_training(job.id, job.device_class)
    return submitted



router.add_api_route("", submit_job, methods=["POST"], status_code=201,
                     response_model=JobSubmitted, responses={
                         200: {"model": PreflightOut,
                               "description": "dry_run=true: what the job would train; "
                                              "nothing was created"},
                         **error_responses(413),
                     },
                     summary="Submit a fine-tuning job (MonsterAPI payload), or check it "
                             "with dry_run=true")


def _statuses(names: list[str]) -> list[JobStatus]:
    return [job_status_named(name) for name in names]


class JobListQuery(BaseModel):
    """The job list's query parameters. Any other is refused: FastAPI would ignore it, and a
    misspelt filter (`?state=FAILED`) would list every job as if it had matched."""

    model_config = {"extra": "forbid"}

    limit: int = Field(20, ge=1, le=100)
    offset: int = Field(0, ge=0, le=1_000_000)
    status: Annotated[
        list[JobStatus], BeforeValidator(_statuses, json_schema_input_type=list[str])
    ] = Field(default_factory=list, description=(
        "Only jobs in this status; repeat it for several (`?status=FAILED&status=CANCELLED`). "
        "QUEUED, RUNNING, PAUSED, COMPLETED, FAILED, CANCELLED, or MonsterAPI's IN_QUEUE, "
        "IN_PROGRESS, TERMINATED, in any case."
    ))
    base_model: str | None = Field(None, min_length=1, max_length=512, description=(
        "Only jobs of this base model, exactly as submitted in "
        "`pretrainedmodel_config.model_path`."
    ))


@router.get("", summary="List this key's jobs (an admin key: every tenant's), newest first")
def list_jobs(caller: TenantDep, session: SessionDep,
              query: Annotated[JobListQuery, Query()]) -> JobList:
    items, total = jobs.list_jobs(session, caller.scope, query.limit, query.offset,
                                  statuses=query.status, base_model=query.base_model)
    return JobList(items=[JobOut.of(j) for j in items], total=total, limit=query.limit,
                   offset=query.offset)


@router.get("/{job_id}", summary="A job's status, phase, progress and result",
            responses=error_responses(404))
def get_job(job_id: JobId, caller: TenantDep, session: SessionDep) -> JobOut:
    return JobOut.of(jobs.get_job(session, caller.scope, job_id))


@router.post("/{job_id}/cancel", summary="Cancel a queued, running or paused job",
             responses=error_responses(404, 409))
def cancel_job(job_id: JobId, caller: TenantDep, session: SessionDep) -> JobOut:
    job = jobs.request_cancel(session, caller.scope, job_id)
    session.commit()
    return JobOut.of(job)


@router.delete("/{job_id}", status_code=204,
               summary="Delete a job with its adapter, checkpoints, exports, logs and metrics "
                       "(Tunery extension); a queued or paused job is cancelled first; 409 "
                       "while it runs (cancel it first) or while a deployment of it is live",
               responses=error_responses(404, 409))
def delete_job(job_id: JobId, caller: TenantDep, session: SessionDep,
               storage: StorageDep) -> Response:
    job_deletion.delete_job(session, storage, caller.scope, job_id)
    session.commit()
    return Response(status_code=204)


@router.post("/{job_id}/pause",
             summary="Pause a job (Tunery extension): a queued job at once, a running one at "
                     "its next step, whose checkpoint it keeps (`pause_requested` until then); "
                     "409 once finished or while a cancel is under way",
             responses=error_responses(404, 409))
def pause_job(job_id: JobId, caller: TenantDep, session: SessionDep) -> JobOut:
    job = jobs.request_pause(session, caller.scope, job_id)
    session.commit()
    return JobOut.of(job)


@router.post("/{job_id}/resume",
             summary="Resume a paused job (Tunery extension): QUEUED again, it continues from "
                     "the step it paused at; withdraws a pause a running job has not reached "
                     "yet; 409 once finished",
             responses=error_responses(404, 409))
def resume_job(job_id: JobId, caller: TenantDep, session: SessionDep) -> JobOut:
    job = jobs.resume_job(session, caller.scope, job_id)
    session.commit()
    if job.status == JobStatus.QUEUED:
        # After the commit, as for a submit: the worker that wakes up must find it QUEUED.
        # To the class it was routed to at submit, whatever the classes are now (a class an
        # operator removed meanwhile: the maintenance sweep tells the job so).
        enqueue_training(job.id, job.device_class)
    return JobOut.of(job)


@router.get("/{job_id}/logs", summary="A job's last log lines, or those after a line id",
            responses=error_responses(404))
def job_logs(job_id: JobId, caller: TenantDep, session: SessionDep,
             n_lines: NLines = 100, after: AfterLine = None) -> LogsOut:
    job = jobs.get_job(session, caller.scope, job_id)
    rows = (jobs.tail_logs(session, job.id, n_lines) if after is None
            else jobs.logs_after(session, job.id, after, n_lines))
    return LogsOut.of(job, rows, after)


@router.get("/{job_id}/metrics", summary="Per-step training metrics",
            responses=error_responses(404))
def job_metrics(job_id: JobId, caller: TenantDep, session: SessionDep) -> MetricsOut:
    job = jobs.get_job(session, caller.scope, job_id)
    rows = jobs.list_metrics(session, job.id)
    return MetricsOut(job_id=job.id, metrics=[
        MetricOut(step=r.step, attempt=r.attempt, at=r.at, values=r.values) for r in rows
    ])


@router.get("/{job_id}/artifacts", summary="Files the job produced, with download links",
            responses=error_responses(404))
def job_artifacts(job_id: JobId, caller: TenantDep, session: SessionDep, storage: StorageDep,
                  settings: SettingsDep) -> ArtifactsOut:
    job = jobs.get_job(session, caller.scope, job_id)
    found = list_artifacts(storage, job.id) if job.status == JobStatus.COMPLETED else []
    artifacts = []
    for artifact in found:
        url = storage.presigned_url(artifact.key, settings.storage.s3_presign_expiry_s)
        artifacts.append(ArtifactOut(
            name=artifact.name, size=artifact.size,
            download_url=url or f"/v1/finetune/llm/{job.id}/artifacts/{artifact.name}",
        ))
    archive_url = f"/v1/finetune/llm/{job.id}/artifacts/{ARCHIVE}" if found else None
    return ArtifactsOut(job_id=job.id, status=JobStatus(job.status), artifacts=artifacts,
                        archive_url=archive_url)


# Before `/artifacts/{name:path}`, which would otherwise take "archive" for a file name.
@router.get(f"/{{job_id}}/artifacts/{ARCHIVE}",
            summary="Download the adapter and its tokenizer in one tar.gz (exports apart)",
            response_class=StreamingResponse, responses={
                200: {"content": {"application/gzip": {"schema": {
                    "type": "string", "format": "binary"}}}},
                **error_responses(404),
            })
def download_artifacts_archive(job_id: JobId, caller: TenantDep, session: SessionDep,
                               storage: StorageDep) -> StreamingResponse:
    job = jobs.get_job(session, caller.scope, job_id)
    if job.status != JobStatus.COMPLETED:
        raise ApiError(404, "not_found", f"job {job.id} is {job.status}: its artifacts can be "
                       "downloaded once it has COMPLETED")
    # The archive is what `PeftModel.from_pretrained` is given; exports are downloaded alone.
    found = list_artifacts(storage, job.id, exports=False)
    if not found:
        raise ApiError(404, "not_found", f"job {job.id} has no artifacts in storage")
    folder = archive_folder(job.id)
    return StreamingResponse(
        stream_archive(storage, found, folder=folder, mtime=job.finished_at),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{folder}.tar.gz"'},
    )


@router.get("/{job_id}/artifacts/{name:path}", summary="Download one artifact",
            response_class=StreamingResponse, responses={
                200: {"content": {"application/octet-stream": {"schema": {
                    "type": "string", "format": "binary"}}}},
                **error_responses(404),
            })
def download_artifact(job_id: JobId, name: str, caller: TenantDep, session: SessionDep,
                      storage: StorageDep) -> StreamingResponse:
    job = jobs.get_job(session, caller.scope, job_id)
    not_found = ApiError(404, "not_found", f"job {job.id} has no artifact named {name!r}")
    if job.status != JobStatus.COMPLETED:
        raise not_found
    try:
        key = validate_key(storage_keys.job_artifact_key(job.id, name))
        if storage_keys.artifact_name(job.id, key) is None:
            raise not_found
        size = storage.size(key)
    except (ObjectNotFound, StorageError, ValueError):
        raise not_found from None
    filename = name.rsplit("/", 1)[-1]
    return StreamingResponse(
        storage.iter_bytes(key),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size),
                 "Content-Disposition": f'attachment; filename="{filename}"'},
    )
