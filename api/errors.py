"""One error shape for every 4xx/5xx: {"error": {"code", "message", "fields"}}."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shared.datasets import DatasetNotFound, DatasetRejected, UploadRefused
from shared.deployments import DeploymentNotFound, DeploymentRefused, DeploymentTerminated
from shared.idempotency import HEADER as IDEMPOTENCY_HEADER
from shared.idempotency import IdempotencyKeyRejected
from shared.jobs import JobConflict, JobNotFound
from shared.storage import StorageError
from shared.tenant_weights import TenantNotFound
from shared.webhooks.endpoints import EndpointNotFound, EndpointRefused

log = logging.getLogger("tunery.api")


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_UNPARSEABLE = ("the body is not JSON this server can read: invalid UTF-8, nested too deeply, "
                "or a number too long")


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


class FieldError(BaseModel):
    path: str = Field(description="Dotted path of the offending field, e.g. "
                                  "`training_config.learning_rate` or `body`.")
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable: invalid_request, unauthorized, "
                                  "not_found, conflict, payload_too_large, internal_error, …")
    message: str = Field(description="What went wrong, for a person.")
    fields: list[FieldError] = Field(description="Per-field problems (422); may be empty.")


class ErrorOut(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "A malformed request header; `fields` names it",
    401: "Missing, invalid or revoked API key",
    403: "Not allowed",
    404: "No such object for this API key (another tenant's object answers the same)",
    409: "The object is in a state where this action is not possible",
    410: "The object existed but is gone for this action (a terminated deployment)",
    413: "Request or dataset larger than this server accepts",
    415: "Unsupported content type",
    422: "Invalid request; `fields` names each problem",
    429: "Too many requests; retry after `Retry-After` seconds",
    500: "Internal error (no detail leaves the server)",
    502: "The inference engine failed to answer",
    503: "A service behind the API (the database, an inference engine) is unavailable; retry "
         "after `Retry-After` seconds",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting `statuses` with the error shape."""
    return {status: {"model": ErrorOut, "description": _ERROR_DESCRIPTIONS[status]}
            for status in statuses}


AUTHENTICATED = error_responses(401, 422, 429, 500, 503)


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, "
                                  "rate_limit_error or server_error.")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None


class OpenAIErrorOut(BaseModel):
    """The body of every 4xx and 5xx answer of the OpenAI dialect's routes."""

    error: OpenAIErrorDetail


_OPENAI_DESCRIPTIONS = {**_ERROR_DESCRIPTIONS,
                        400: "Invalid request, or an action the object's state refuses; "
                             "`param` names the field"}


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the OpenAI dialect: its error shape, and 400 where Tunery's
    routes say 409 or 422."""
    return {status: {"model": OpenAIErrorOut, "description": _OPENAI_DESCRIPTIONS[status]}
            for status in sorted({400 if s in (409, 422) else s for s in statuses})}


OPENAI_AUTHENTICATED = openai_error_responses(400, 401, 429, 500, 503)
"""What any route behind the API key may answer besides success (429: the per-key rate
limit); set on the routers."""


# What pydantic puts in an error's location for the member of a union (`str | list[str]`)
# or a validator that refused the value: a type, never a field the client sent.
_UNION_MEMBER = re.compile(r"(str|int|float|bool|bytes|none|[a-z_-]+\[.*\]|[A-Z][A-Za-z0-9]*)")


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    parts = [p for p in parts if not _UNION_MEMBER.fullmatch(p)]
    return ".".join(parts) or "body"


def _validation_fields(exc: RequestValidationError) -> list[dict[str, str]]:
    return validation_fields(exc.errors())


def validation_fields(errors: Sequence[Any]) -> list[dict[str, str]]:
    """pydantic's errors as `fields` of the error shape: a dotted path and a message."""
    fields = []
    for err in errors:
        message = str(err.get("msg", "invalid value"))
        if err.get("type") == "extra_forbidden":
            message = "unknown field; check its spelling against the API reference at /docs"
        message = message.removeprefix("Value error, ")
        # A body that is not JSON at all has the character offset as its location.
        path = "body" if err.get("type") == "json_invalid" else _field_path(
            tuple(err.get("loc", ())))
        fields.append({"path": path, "message": message})
    return fields


OPENAI_PATHS = ("/v1/files", "/v1/fine_tuning", "/v1/models", "/v1/chat/", "/v1/completions",
                "/v1/deployments", "/v1/webhook_endpoints", "/v1/webhook_event_types")
"""Routes of the OpenAI dialect: their errors take OpenAI's shape and status codes."""

_OPENAI_CODES = {"unauthorized": "invalid_api_key", "rate_limited": "rate_limit_exceeded"}


def error_response(request: Request, status: int, code: str, message: str,
                   fields: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error answer in the dialect of the route asked: Tunery's shape, or OpenAI's on
    `OPENAI_PATHS`."""
    if request.url.path.startswith(OPENAI_PATHS):
        return openai_error(status, code, message, fields, headers)
    return JSONResponse(error_body(code, message, fields), status, headers=headers)


def openai_error(status: int, code: str, message: str,
                 fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes.

    OpenAI's SDK retries 408, 409, 429 and 5xx unless told not to: a request that is wrong
    (422 here) is OpenAI's 400, a conflict that no retry resolves (cancelling a finished
    job) is a 400 too, and every 4xx but 429 says `x-should-retry: false`.
    """
    status = 400 if status in (409, 422) else status
    headers = dict(headers or {})
    if 400 <= status < 500 and status != 429:
        headers["x-should-retry"] = "false"
    kind = ("server_error" if status >= 500 else "rate_limit_error" if status == 429
            else "authentication_error" if status == 401 else "invalid_request_error")
    param = fields[0]["path"] if fields else None
    body = {"error": {"message": message, "type": kind, "param": param,
                      "code": _OPENAI_CODES.get(code, code)}}
    return JSONResponse(body, status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.fields,
                              exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = _validation_fields(exc)
        summary = "; ".join(f"{f['path']}: {f['message']}" for f in fields[:5])
        return error_response(request, 422, "invalid_request", summary, fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it could not decode (not UTF-8, nested past the
            # parser's depth, a number of thousands of digits), while malformed JSON is its
            # 422: one answer for both, so a client handles "the body is not JSON" once.
            return error_response(request, 422, "invalid_request", _UNPARSEABLE,
                                  [{"path": "body", "message": _UNPARSEABLE}])
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(request, exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(request, 404, "not_found", f"no job with id {exc.args[0]}")

    @app.exception_handler(TenantNotFound)
    async def _no_tenant(request: Request, exc: TenantNotFound) -> JSONResponse:
        return error_response(request, 404, "not_found", f"no tenant with id {exc.args[0]}")

    @app.exception_handler(DeploymentNotFound)
    async def _no_deployment(request: Request, exc: DeploymentNotFound) -> JSONResponse:
        return error_response(request, 404, "not_found", f"no deployment with id {exc.args[0]}")

    @app.exception_handler(DeploymentTerminated)
    async def _terminated(request: Request, exc: DeploymentTerminated) -> JSONResponse:
        return error_response(request, 410, "deployment_terminated",
                              f"deployment {exc.deployment.id} was terminated; deploy the job "
                              "again (POST /v1/deploy/llm) for a new endpoint")

    @app.exception_handler(DeploymentRefused)
    async def _deploy_refused(request: Request, exc: DeploymentRefused) -> JSONResponse:
        code = {404: "not_found", 409: "conflict"}.get(exc.status, "invalid_request")
        return error_response(request, exc.status, code, exc.message,
                              [{"path": exc.field, "message": exc.message}])

    @app.exception_handler(EndpointNotFound)
    async def _no_endpoint(request: Request, exc: EndpointNotFound) -> JSONResponse:
        return error_response(request, 404, "not_found",
                              f"no webhook endpoint with id {exc.args[0]}")

    @app.exception_handler(EndpointRefused)
    async def _endpoint_refused(request: Request, exc: EndpointRefused) -> JSONResponse:
        return error_response(request, 422, "invalid_request", exc.message,
                              [{"path": exc.field, "message": exc.message}])

    @app.exception_handler(DatasetNotFound)
    async def _no_dataset(request: Request, exc: DatasetNotFound) -> JSONResponse:
        return error_response(request, 404, "not_found", f"no dataset with id {exc.args[0]}")

    @app.exception_handler(DatasetRejected)
    async def _rejected(request: Request, exc: DatasetRejected) -> JSONResponse:
        if exc.too_large:
            return error_response(request, 413, "payload_too_large", exc.message)
        fields = [{"path": "file", "message": exc.message}]
        return error_response(request, 422, "invalid_dataset", exc.message, fields)

    @app.exception_handler(UploadRefused)
    async def _upload_refused(request: Request, exc: UploadRefused) -> JSONResponse:
        if exc.conflict:
            return error_response(request, 409, "conflict", exc.message)
        return error_response(request, 403, "forbidden", exc.message)

    @app.exception_handler(IdempotencyKeyRejected)
    async def _idempotency(request: Request, exc: IdempotencyKeyRejected) -> JSONResponse:
        fields = [{"path": IDEMPOTENCY_HEADER, "message": exc.message}]
        return error_response(request, 422, exc.code, exc.message, fields)

    @app.exception_handler(JobConflict)
    async def _conflict(request: Request, exc: JobConflict) -> JSONResponse:
        return error_response(request, 409, "conflict", str(exc))

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(request, 503, "database_unavailable",
                              "the database is unavailable; retry shortly",
                              headers={"Retry-After": "5"})

    @app.exception_handler(StorageError)
    async def _storage_down(request: Request, exc: StorageError) -> JSONResponse:
        # Its message names the bucket or directory: for the operator's log, not the caller.
        log.warning("storage unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(request, 503, "storage_unavailable",
                              "the object storage is unavailable; retry shortly",
                              headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal_error", "internal server error")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette names only the first route that
    matched the path, so `DELETE /v1/finetune/llm`'s 405 would leave out `GET` or `POST`."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)
