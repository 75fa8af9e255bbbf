"""`/v1/upload`: MonsterAPI's upload flow.

`GET /v1/upload?filename=` hands out an `upload_url` to PUT the file's bytes to and a
`download_url` to pass as `data_path`. On S3 the upload URL is presigned and the bytes go
straight to the bucket; with local storage it is `PUT /v1/upload/{id}?token=…` here. The
`download_url` is the dataset id (`ds_…`), not a URL: the worker reads uploaded datasets from
storage and never has to reach the API, and the id also works in the other dataset routes.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import RateLimited, ScratchDirDep, SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import AUTHENTICATED, error_responses
from api.limits.auth_failures import refuse_if_over
from api.routes.datasets import check_quota, commit_or_discard
from api.schemas import DatasetOut, UploadUrlOut
from api.session_route import SessionRoute
from api.uploads import receive_body
from shared import datasets
from shared.models import Dataset
from shared.settings import Settings
from shared.storage import Storage

router = APIRouter(route_class=SessionRoute,
                   prefix="/v1/upload", tags=["datasets"])

UploadId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


# Rate-limited here rather than on the router: the PUT beside it carries an upload token,
# not an API key.
@router.get("", summary="A URL to PUT a dataset file to, and the id to train on it",
            responses={**AUTHENTICATED, **error_responses(413)}, dependencies=[RateLimited])
def upload_url(filename: Annotated[str, Query(min_length=1, max_length=255)],
               request: Request, caller: TenantDep, session: SessionDep,
               storage: StorageDep, settings: SettingsDep) -> UploadUrlOut:
    expires_s = settings.storage.s3_presign_expiry_s
    check_quota(session, settings, caller.tenant_id, 0)
    dataset, token, url = datasets.start_upload(
        session, storage, caller.tenant_id, filename, expires_s
    )
    session.commit()
    if url is None:
        url = str(request.url_for("receive_upload", upload_id=dataset.id)
                  .include_query_params(token=token))
    return UploadUrlOut(upload_url=url, download_url=dataset.id, dataset_id=dataset.id,
                        expires_in=expires_s)


@router.put("/{upload_id}", name="receive_upload",
            responses=error_responses(403, 409, 413, 422, 429, 500, 503),
            summary="Receive the bytes of an upload (local storage; the token is the auth)")
async def receive_upload(upload_id: UploadId,
                         token: Annotated[str, Query(min_length=1, max_length=200)],
                         request: Request, session: SessionDep, storage: StorageDep,
                         settings: SettingsDep, scratch: ScratchDirDep) -> DatasetOut:
    # The token is checked before the body is read: a bad URL costs the client no upload.
    try:
        dataset = await run_in_threadpool(datasets.dataset_for_upload, session, upload_id, token)
    except datasets.UploadRefused as refused:
        if not refused.conflict:  # a wrong token (or id): a guess, counted per address
            refuse_if_over(request, "upload tokens")
        raise
    path = scratch / dataset.name
    size = await receive_body(request, path, settings.limits.max_dataset_bytes)
    # The pending row is counted already; only the bytes are new. Refused, it stays pending.
    await run_in_threadpool(check_quota, session, settings, dataset.tenant_id, size,
                            new_dataset=False)
    await run_in_threadpool(_finish, session, storage, settings, dataset,
                            request.headers.get("content-type"), path)
    return DatasetOut.of(dataset)


def _finish(session: Session, storage: Storage, settings: Settings, dataset: Dataset,
            content_type: str | None, path: FilePath) -> None:
    try:
        datasets.finish_upload(storage, dataset, path, content_type=content_type,
                               max_bytes=settings.limits.max_dataset_bytes)
    finally:
        # A rejected file leaves the upload "failed" with the reason.
        commit_or_discard(session, storage, dataset)
