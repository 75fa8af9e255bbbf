"""`/v1/finetune/llm/{job_id}/exports` (Tunery extension): a completed job as a merged model
or a GGUF file with an Ollama Modelfile, built by a worker after the fact. The files are the
job's artifacts under `exports/{kind}/`, downloaded through the artifacts routes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import SessionDep, TenantDep
from api.errors import AUTHENTICATED, error_responses
from api.routes.finetune import JobId
from api.schemas import ExportOut, ExportsOut
from api.session_route import SessionRoute
from shared import exports, jobs
from shared.models import ExportStatus
from shared.queue import enqueue_export
from shared.schema import ExportRequest

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/finetune/llm", tags=["finetune"], responses=AUTHENTICATED)


@router.post(
    "/{job_id}/exports", status_code=202, response_model=ExportOut,
    summary="Export a completed job as a merged model or GGUF (Tunery extension)",
    responses={200: {"model": ExportOut, "description": "The export already asked for"},
               **error_responses(404, 409, 422)},
)
def create_export(job_id: JobId, body: ExportRequest, caller: TenantDep,
                  session: SessionDep) -> JSONResponse:
    """202 with a new (or re-queued, after it FAILED) export; 200 with the existing one when
    the same format and quantization were asked for before."""
    export, queue_it = exports.request_export(session, caller.scope, job_id, body)
    session.commit()
    # A QUEUED export asked for again gets another wake-up too: its first may have been lost,
    # and a duplicate claims nothing.
    if queue_it or export.status == ExportStatus.QUEUED:
        # To the job's class: the merge loads the base model the job trained on.
        enqueue_export(export.id, jobs.get_job(session, caller.scope, job_id).device_class)
    return JSONResponse(ExportOut.of(export).model_dump(mode="json"),
                        status_code=202 if queue_it else 200)


@router.get("/{job_id}/exports", summary="A job's exports, with the artifacts to download",
            responses=error_responses(404))
def list_exports(job_id: JobId, caller: TenantDep, session: SessionDep) -> ExportsOut:
    found = exports.list_exports(session, caller.scope, job_id)
    return ExportsOut(job_id=job_id, exports=[ExportOut.of(export) for export in found])
