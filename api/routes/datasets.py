"""`/v1/datasets`: upload a dataset file, read its metadata, preview a prompt template on it
(token by token with a local model's tokenizer), delete it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.dataset_lookup import resolve_dataset
from api.deps import ScratchDirDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import AUTHENTICATED, ApiError, error_responses
from api.example_preview import render_examples
from api.replay import replayed
from api.schemas import DatasetList, DatasetOut, PreviewIn, PreviewOut
from api.session_route import SessionRoute
from api.uploads import ReceivedFile, receive_multipart_file
from shared import datasets, idempotency, token_preview
from shared.dataset_columns import missing_columns_message
from shared.models import Dataset
from shared.settings import Settings
from shared.storage import Storage

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/datasets", tags=["datasets"], responses=AUTHENTICATED)

Answer = TypeVar("Answer", bound=BaseModel)
UploadKeyHeader = Annotated[str | None, Header(
    alias=idempotency.HEADER,
    description="Optional, 1 to 255 printable ASCII characters, scoped to the API key. A retry "
    "of the same upload (same bytes, file name and form fields) with the same key within "
    "TUNERY_IDEMPOTENCY_TTL_S returns the first response, marked `Idempotent-Replayed: true`, "
    "and stores nothing twice; the same key with another file is a 422.",
)]
DatasetId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


@router.post("", status_code=201, openapi_extra=_MULTIPART_BODY, response_model=DatasetOut,
             responses=error_responses(413, 415),
             summary="Upload a json, jsonl, csv or parquet file (multipart field 'file')")
async def upload_dataset(request: Request, caller: TenantDep, session: SessionDep,
                         storage: StorageDep, settings: SettingsDep, scratch: ScratchDirDep,
                         idempotency_key: UploadKeyHeader = None) -> DatasetOut | JSONResponse:
    # Refused before the body is read when the tenant is already past its quota.
    await run_in_threadpool(check_quota, session, settings, caller.tenant_id, 0)
    received = await receive_multipart_file(
        request, scratch / "upload", settings.limits.max_dataset_bytes
    )
    keyed = keyed_upload(caller.key_id, idempotency_key, received, settings)
    # Parsing a large file and copying it to storage take seconds: off the event loop.
    return await run_in_threadpool(store_keyed_upload, session, storage, settings,
                                   caller.tenant_id, received, keyed, 201, DatasetOut.of)


def keyed_upload(api_key_id: str, header: str | None, received: ReceivedFile,
                 settings: Settings) -> idempotency.KeyedRequest | None:
    """The upload's idempotency scope, or None without the header. The body is the file as
    it streamed in (its SHA-256 and size), its name and the form fields sent with it."""
    return idempotency.keyed_request(
        api_key_id, header,
        idempotency.upload_hash(received.sha256, received.size, received.filename,
                                received.form),
        settings.limits.idempotency_ttl_s)


def store_keyed_upload(session: Session, storage: Storage, settings: Settings, tenant_id: str,
                       received: ReceivedFile, keyed: idempotency.KeyedRequest | None,
                       status: int, respond: Callable[[Dataset], Answer], *,
                       purpose: str | None = None) -> Answer | JSONResponse:
    """`store_upload` under an `Idempotency-Key`: a retry of an upload already stored
    replays its first response, and of concurrent retries only one keeps its dataset (the
    unique key decides, as for a submit); the others' objects are removed."""
    if keyed and (earlier := keyed.earlier_response(session)):
        return replayed(earlier)
    dataset = store_upload(session, storage, settings, tenant_id, received, purpose=purpose,
                           keyed=keyed, status=status, respond=respond)
    if isinstance(dataset, idempotency.StoredResponse):
        return replayed(dataset)
    return respond(dataset)



def check_quota(session: Session, settings: Settings, tenant_id: str, new_bytes: int, *,
                new_dataset: bool = True) -> None:
    """413 when the tenant cannot keep one more dataset (`new_dataset`) or `new_bytes` more
    bytes of them; the message says what is used and the limit."""
    usage = datasets.tenant_usage(session, tenant_id)
    problem = datasets.dataset_count_problem(usage, settings.limits.max_tenant_datasets) if (
        new_dataset) else None
    problem = problem or datasets.dataset_bytes_problem(
        usage, new_bytes, settings.limits.max_tenant_dataset_bytes)
    if problem:
        raise ApiError(413, "payload_too_large", problem)


def commit_or_discard(session: Session, storage: Storage, dataset: Dataset) -> None:
    """Commit the dataset's row; if that fails, remove what was stored for it, so no object
    is left without a row."""
    try:
        session.commit()
    except BaseException:
        session.rollback()
        datasets.discard_objects(storage, dataset.id)
        raise


def store_upload(session: Session, storage: Storage, settings: Settings, tenant_id: str,
                 received: ReceivedFile, *, purpose: str | None = None,
                 keyed: idempotency.KeyedRequest | None = None, status: int = 201,
                 respond: Callable[[Dataset], BaseModel] = DatasetOut.of,
                 ) -> Dataset | idempotency.StoredResponse:
    """Check, store and commit a received dataset file within the tenant's quota. A file
    with OpenAI's `purpose` is also checked by OpenAI's rules for training files. Under
    `keyed`, the response (`respond`, `status`) is recorded in the same transaction; a
    concurrent retry that recorded first wins, and its response is returned instead."""
    check_quota(session, settings, tenant_id, received.size)
    dataset = datasets.create_dataset(
        session, storage, tenant_id, received.path, name=received.filename,
        content_type=received.content_type, max_bytes=settings.limits.max_dataset_bytes,
        check_openai=purpose is not None,
    )
    dataset.purpose = purpose
    if keyed is not None:
        session.flush()
        response = idempotency.StoredResponse(status, respond(dataset).model_dump(mode="json"))
        try:
            earlier = keyed.record(session, response, dataset_id=dataset.id)
        except BaseException:
            session.rollback()
            datasets.discard_objects(storage, dataset.id)
            raise
        if earlier is not None:  # rolled back: this upload's objects have no row
            datasets.discard_objects(storage, dataset.id)
            return earlier
    commit_or_discard(session, storage, dataset)
    return dataset


@router.get("", summary="This key's datasets (an admin key: every tenant's), newest first")
def list_datasets(caller: TenantDep, session: SessionDep,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> DatasetList:
    items, total = datasets.list_datasets(session, caller.scope, limit, offset)
    return DatasetList(items=[DatasetOut.of(d) for d in items], total=total, limit=limit,
                       offset=offset)


@router.get("/{dataset_id}", summary="A dataset's rows, columns and first rows",
            responses=error_responses(404))
def get_dataset(dataset_id: DatasetId, caller: TenantDep, session: SessionDep,
                storage: StorageDep, settings: SettingsDep) -> DatasetOut:
    try:
        dataset = resolve_dataset(session, storage, settings, caller.scope, dataset_id)
    except datasets.DatasetRejected:
        # The metadata answers with status "failed" and the reason; nothing to refuse here.
        dataset = datasets.get_dataset(session, caller.scope, dataset_id)
    return DatasetOut.of(dataset)


@router.post("/{dataset_id}/preview", responses=error_responses(404, 409, 413, 422),
             summary="Render the first rows with a prompt template, prompt and completion apart; "
                     "with a local model_path, also token by token as a job trains on them")
def preview_dataset(dataset_id: DatasetId, body: PreviewIn, caller: TenantDep,
                    session: SessionDep, storage: StorageDep,
                    settings: SettingsDep) -> PreviewOut:
    dataset = resolve_dataset(session, storage, settings, caller.scope, dataset_id)
    reason = datasets.not_ready_reason(dataset)
    if reason:
        raise ApiError(409, "conflict", reason)
    preview = datasets.preview(dataset, body.prompt_template, body.n)
    try:
        rendered = render_examples(
            preview, model_path=body.model_path, prompt_template=body.prompt_template,
            cutoff_len=body.cutoff_len, train_on_inputs=body.train_on_inputs,
            allowed_local_dirs=settings.sources.allowed_local_dirs)
    except token_preview.TokenPreviewError as exc:
        raise ApiError(422, "invalid_request", f"model_path: {exc}",
                       [{"path": "model_path", "message": str(exc)}]) from None
    message = (missing_columns_message(body.prompt_template, dataset.columns or [])
               or _loss_message(preview)) + rendered.note
    if len(message) > datasets.PREVIEW_MESSAGE_CHARS:
        message = message[: datasets.PREVIEW_MESSAGE_CHARS - 1] + "…"
    return PreviewOut(
        dataset_id=dataset.id,
        placeholders=preview.placeholders,
        missing_columns=preview.missing_columns,
        message=message,
        examples=rendered.examples,
    )


def _loss_message(preview: datasets.Preview) -> str:
    if preview.chat:
        return ("chat mode: each conversation is shown as 'role: content' lines; the loss is "
                "computed on every assistant turn (the completion shows the last one).")
    return (f"every placeholder has a column; the loss is computed on "
            f"{{{preview.completion_placeholder}}} and the text after it.")


@router.delete("/{dataset_id}", status_code=204, responses=error_responses(404, 409),
               summary="Delete a dataset: its stored file and its row")
def delete_dataset(dataset_id: DatasetId, caller: TenantDep, session: SessionDep,
                   storage: StorageDep) -> Response:
    dataset = datasets.get_dataset(session, caller.scope, dataset_id)
    try:
        datasets.delete_dataset(session, storage, dataset)
    except datasets.DatasetInUse as exc:
        raise ApiError(409, "conflict", exc.message) from None
    session.commit()
    return Response(status_code=204)
