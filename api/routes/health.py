"""Liveness and readiness probes (no API key: orchestrators call them)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, StorageDep
from api.session_route import SessionRoute
from shared.queue import check_broker
from shared.storage import StorageError, storage_problem

router = APIRouter(route_class=SessionRoute,
                   tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database, broker and storage are reachable")
def readyz(session: SessionDep, storage: StorageDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a probe reports, it does not raise
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        check_broker()
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    try:
        storage.check()
        checks["storage"] = "ok"
    except StorageError as exc:
        # The cause first (unreachable, bucket_missing, access_denied), then what to check.
        # Store messages name the endpoint, bucket and settings, never a credential's value.
        checks["storage"] = f"{storage_problem(exc)}: {exc}"
    except Exception as exc:  # noqa: BLE001
        checks["storage"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        200 if ready else 503)
