"""Typed dependencies: a route asks for `SessionDep`, `TenantDep`, `StorageDep`."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import ApiError
from shared.db import session_factory
from shared.keys import authenticate
from shared.settings import Settings, get_settings
from shared.storage import Storage, storage_from_settings


def get_db() -> Iterator[Session]:
    session = session_factory()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_storage(settings: SettingsDep) -> Storage:
    return storage_from_settings(settings)


StorageDep = Annotated[Storage, Depends(get_storage)]


def get_scratch_dir() -> Iterator[Path]:
    """A directory for one request's files (received uploads), removed after the response.

    Under the system temp dir (TMPDIR): it needs room for TUNERY_MAX_DATASET_BYTES per
    upload in flight.
    """
    with tempfile.TemporaryDirectory(prefix="tunery-upload-") as tmp:
        yield Path(tmp)


ScratchDirDep = Annotated[Path, Depends(get_scratch_dir)]


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str


_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def get_caller(request: Request, session: SessionDep) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                       headers=_UNAUTHORIZED)
    key = authenticate(session, token.strip())
    if key is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=_UNAUTHORIZED)
    session.commit()  # last_used_at
    return Caller(tenant_id=key.tenant_id, key_id=key.id)


TenantDep = Annotated[Caller, Depends(get_caller)]
