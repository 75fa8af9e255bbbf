"""One error shape for every 4xx/5xx: {"error": {"code", "message", "fields"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.datasets import DatasetNotFound, DatasetRejected, UploadRefused
from shared.idempotency import HEADER as IDEMPOTENCY_HEADER
from shared.idempotency import IdempotencyKeyRejected
from shared.jobs import JobConflict, JobNotFound

log = logging.getLogger("tunery.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields = fields or []
        self.headers = headers


def error_body(code: str, message: str, fields: list[dict[str, str]] | None = None) -> dict:
    return {"error": {"code": code, "message": message, "fields": fields or []}}


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _validation_fields(exc: RequestValidationError) -> list[dict[str, str]]:
    fields = []
    for err in exc.errors():
        message = str(err.get("msg", "invalid value"))
        if err.get("type") == "extra_forbidden":
            message = "unknown field; check its spelling against the API reference"
        message = message.removeprefix("Value error, ")
        fields.append({"path": _field_path(tuple(err.get("loc", ()))), "message": message})
    return fields


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.fields), exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = _validation_fields(exc)
        summary = "; ".join(f"{f['path']}: {f['message']}" for f in fields[:5])
        return JSONResponse(error_body("invalid_request", summary, fields), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse(error_body("not_found", f"no job with id {exc.args[0]}"), 404)

    @app.exception_handler(DatasetNotFound)
    async def _no_dataset(_: Request, exc: DatasetNotFound) -> JSONResponse:
        return JSONResponse(error_body("not_found", f"no dataset with id {exc.args[0]}"), 404)

    @app.exception_handler(DatasetRejected)
    async def _rejected(_: Request, exc: DatasetRejected) -> JSONResponse:
        if exc.too_large:
            return JSONResponse(error_body("payload_too_large", exc.message), 413)
        fields = [{"path": "file", "message": exc.message}]
        return JSONResponse(error_body("invalid_dataset", exc.message, fields), 422)

    @app.exception_handler(UploadRefused)
    async def _upload_refused(_: Request, exc: UploadRefused) -> JSONResponse:
        if exc.conflict:
            return JSONResponse(error_body("conflict", exc.message), 409)
        return JSONResponse(error_body("forbidden", exc.message), 403)

    @app.exception_handler(IdempotencyKeyRejected)
    async def _idempotency(_: Request, exc: IdempotencyKeyRejected) -> JSONResponse:
        fields = [{"path": IDEMPOTENCY_HEADER, "message": exc.message}]
        return JSONResponse(error_body(exc.code, exc.message, fields), 422)

    @app.exception_handler(JobConflict)
    async def _conflict(_: Request, exc: JobConflict) -> JSONResponse:
        return JSONResponse(error_body("conflict", str(exc)), 409)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            error_body("database_unavailable", "the database is unavailable; retry shortly"),
            503, headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), 500)
