"""OpenAI's `/v1/files`: training files are uploaded datasets, with the same parsing, limits
and storage as `/v1/datasets`; a finished job's result file is read from its metrics."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import ColumnElement
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import ScratchDirDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import OPENAI_AUTHENTICATED, ApiError, openai_error_responses
from api.openai import ids
from api.openai.job_view import epoch
from api.openai.results import FILE_NAME, result_csv, served
from api.openai.schemas import FileDeleted, FileList, FileObject
from api.routes.datasets import UploadKeyHeader, check_quota, keyed_upload, store_keyed_upload
from api.session_route import SessionRoute
from api.uploads import receive_multipart_file
from shared import datasets, jobs
from shared.models import Dataset, DatasetStatus, Job, JobStatus
from shared.tenancy import CursorNotFound, Scope

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/files", tags=["openai: files"], responses=OPENAI_AUTHENTICATED)

TRAINING_PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"
_LIST_PARAMETERS = frozenset({"after", "limit", "order", "purpose"})
FileId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
_STATUS = {DatasetStatus.READY.value: "processed", DatasetStatus.FAILED.value: "error",
           DatasetStatus.PENDING.value: "uploaded"}
_MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": [TRAINING_PURPOSE]}}}}}}}


def file_object(dataset: Dataset) -> FileObject:
    return FileObject(
        id=ids.file_id(dataset.id), bytes=dataset.size_bytes or 0,
        created_at=epoch(dataset.created_at) or 0, filename=dataset.name,
        purpose=dataset.purpose or TRAINING_PURPOSE,
        status=_STATUS.get(dataset.status, "uploaded"),  # type: ignore[arg-type]
        status_details=dataset.error,
    )


@router.post("", openapi_extra=_MULTIPART_BODY, response_model=FileObject,
             responses=openai_error_responses(413, 415),
             summary="Upload a training file (multipart 'file' and purpose 'fine-tune')")
async def upload_file(request: Request, caller: TenantDep, session: SessionDep,
                      storage: StorageDep, settings: SettingsDep, scratch: ScratchDirDep,
                      idempotency_key: UploadKeyHeader = None) -> FileObject | Response:
    await run_in_threadpool(check_quota, session, settings, caller.tenant_id, 0)
    received = await receive_multipart_file(request, scratch / "upload",
                                            settings.limits.max_dataset_bytes,
                                            text_fields=("purpose",))
    purpose = received.form.get("purpose")
    if purpose is None:
        raise ApiError(422, "invalid_request", "purpose: field required",
                       [{"path": "purpose", "message": "field required"}])
    if purpose != TRAINING_PURPOSE:
        message = (f"purpose {purpose!r} is not supported: this server takes training files, "
                   f"purpose {TRAINING_PURPOSE!r}")
        raise ApiError(422, "invalid_request", message, [{"path": "purpose", "message": message}])
    keyed = keyed_upload(caller.key_id, idempotency_key, received, settings)
    return await run_in_threadpool(partial(
        store_keyed_upload, session, storage, settings, caller.tenant_id, received, keyed, 200,
        file_object, purpose=TRAINING_PURPOSE))


@router.get("", summary="This key's files, newest first (order=asc: oldest first)")
def list_files(request: Request, caller: TenantDep, session: SessionDep,
               after: Annotated[str | None, Query(max_length=64)] = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               order: Literal["asc", "desc"] = "desc",
               purpose: Annotated[str | None, Query(max_length=64)] = None) -> FileList:
    stray = sorted(set(request.query_params) - _LIST_PARAMETERS)
    if stray:
        message = f"unknown query parameter {stray[0]!r}; use after, limit, order or purpose"
        raise ApiError(422, "invalid_request", message, [{"path": stray[0], "message": message}])
    after_id = None
    if after is not None:
        after_id = ids.dataset_id(after)
        if after_id is None:
            raise _unknown_cursor(after)
    filters: list[ColumnElement[bool]] = []
    if purpose == TRAINING_PURPOSE:
        filters.append(Dataset.purpose.is_(None) | (Dataset.purpose == TRAINING_PURPOSE))
    elif purpose is not None:
        filters.append(Dataset.purpose == purpose)
    try:
        rows, more = datasets.datasets_after(session, caller.scope, after_id, limit,
                                             descending=order == "desc", filters=filters)
    except CursorNotFound:
        raise _unknown_cursor(after or "") from None
    data = [file_object(d) for d in rows]
    return FileList(data=data, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None, has_more=more)


def _unknown_cursor(after: str) -> ApiError:
    message = f"after: no file with id {after}"
    return ApiError(422, "invalid_request", message, [{"path": "after", "message": message}])


@router.get("/{file_id}", summary="A file's size, name, purpose and status",
            responses=openai_error_responses(404))
def get_file(file_id: FileId, caller: TenantDep, session: SessionDep) -> FileObject:
    job_id = ids.job_of_result_file(file_id)
    if job_id is not None:
        job = _result_job(session, caller.scope, job_id, file_id)
        csv_text = result_csv(jobs.list_metrics(session, job.id))
        return FileObject(id=file_id, bytes=len(csv_text.encode()),
                          created_at=epoch(job.finished_at) or 0, filename=FILE_NAME,
                          purpose=RESULTS_PURPOSE, status="processed")
    return file_object(_dataset(session, caller.scope, file_id))


@router.delete("/{file_id}", summary="Delete a training file: its stored bytes and its row",
               responses=openai_error_responses(404, 409))
def delete_file(file_id: FileId, caller: TenantDep, session: SessionDep,
                storage: StorageDep) -> FileDeleted:
    job_id = ids.job_of_result_file(file_id)
    if job_id is not None:
        _result_job(session, caller.scope, job_id, file_id)  # 404 unless the caller has it
        message = "a result file belongs to its job and is deleted with it"
        raise ApiError(409, "conflict", message)
    dataset = _dataset(session, caller.scope, file_id)
    try:
        datasets.delete_dataset(session, storage, dataset)
    except datasets.DatasetInUse as exc:
        raise ApiError(409, "conflict", exc.message) from None
    session.commit()
    return FileDeleted(id=file_id, deleted=True)


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}},
                       **openai_error_responses(404, 409)},
            summary="The file's bytes (a result file: its CSV, base64-encoded by default)")
def file_content(file_id: FileId, caller: TenantDep, session: SessionDep, storage: StorageDep,
                 settings: SettingsDep) -> Response:
    job_id = ids.job_of_result_file(file_id)
    if job_id is not None:
        csv_text = _result_csv(session, caller.scope, job_id, file_id)
        base64_encoded = settings.openai.result_files_base64
        return Response(served(csv_text, base64_encoded=base64_encoded),
                        media_type="application/octet-stream" if base64_encoded else "text/csv")
    dataset = _dataset(session, caller.scope, file_id)
    reason = datasets.not_ready_reason(dataset)
    if reason:
        raise ApiError(409, "conflict", reason)
    return StreamingResponse(storage.iter_bytes(dataset.storage_key),
                             media_type="application/octet-stream",
                             headers={"Content-Length": str(dataset.size_bytes or 0)})


def _dataset(session: Session, scope: Scope, file_id: str) -> Dataset:
    dataset_id = ids.dataset_id(file_id)
    if dataset_id is None:
        raise datasets.DatasetNotFound(file_id)
    try:
        return datasets.get_dataset(session, scope, dataset_id)
    except datasets.DatasetNotFound:
        raise datasets.DatasetNotFound(file_id) from None


def _result_job(session: Session, scope: Scope, job_id: str, file_id: str) -> Job:
    """The completed job whose result file `file_id` is; 404 for the file otherwise."""
    try:
        job = jobs.get_job(session, scope, job_id)
    except jobs.JobNotFound:
        raise datasets.DatasetNotFound(file_id) from None
    if job.status != JobStatus.COMPLETED.value:
        raise datasets.DatasetNotFound(file_id)
    return job


def _result_csv(session: Session, scope: Scope, job_id: str, file_id: str) -> str:
    job = _result_job(session, scope, job_id, file_id)
    return result_csv(jobs.list_metrics(session, job.id))
