"""Typed dependencies: a route asks for `SessionDep`, `TenantDep` (`AdminDep` for an admin's
route), `StorageDep`; a router asks for `RateLimited`, the metrics route for `MetricsReader`."""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.limits.auth_failures import refuse_if_over
from api.limits.rate import RateLimiter
from api.limits.webhook_tests import WebhookTestSends
from api.metrics.access import check_metrics_reader
from shared.db import session_factory
from shared.keys import authenticate, record_use
from shared.models import KeyRole
from shared.settings import Settings, get_settings
from shared.storage import Storage, storage_from_settings
from shared.tenancy import ALL_TENANTS, Scope


async def get_db() -> AsyncIterator[Session]:
    """One request's session. Closed on the event loop, not in the thread pool: the connection
    a sync route leaves checked out goes back to the pool as soon as the route returns. Closed
    on a pool thread, it would wait for a free thread while holding its connection, and a burst
    of requests would hold every connection while every thread waited for one, until the
    pool's timeout answered them all 503."""
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
    """The key's tenant: what it submits and uploads belongs here, admin or not."""
    key_id: str
    key_prefix: str
    """The public part of the key, shown by `tunery keys` and accepted by `keys revoke`."""
    key_name: str
    is_admin: bool = False

    @property
    def scope(self) -> Scope:
        """Whose jobs and datasets this key reads and acts on: pass it to every lookup."""
        return ALL_TENANTS if self.is_admin else self.tenant_id


_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
# The same words for every caller, so they tell a remote one nothing about this server.
UNKNOWN_KEY_MESSAGE = (
    "invalid or revoked API key; a key works only with the database (by default the data dir) "
    "it was created in: `tunery keys list` on the server shows that database's keys"
)
# Declared through FastAPI's scheme so the OpenAPI document says how to authenticate; errors
# stay ours (auto_error=False), in the one error shape.
_BEARER = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                     description="An API key from `tunery keys create`: "
                                 "`Authorization: Bearer tun_…`")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


def get_caller(request: Request, credentials: BearerDep, session: SessionDep) -> Caller:
    """The caller its API key names; 401 without a valid one, 429 instead once the client's
    address has failed too often (`api.limits.auth_failures`)."""
    token = credentials.credentials if credentials else ""
    if not token.strip():
        refuse_if_over(request, "authentications")
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                       headers=_UNAUTHORIZED)
    key = authenticate(session, token.strip())
    if key is None:
        refuse_if_over(request, "authentications")
        raise ApiError(401, "unauthorized", UNKNOWN_KEY_MESSAGE, headers=_UNAUTHORIZED)
    wrote = record_use(session, key)
    caller = Caller(tenant_id=key.tenant_id, key_id=key.id, key_prefix=key.prefix,
                    key_name=key.name, is_admin=key.role == KeyRole.ADMIN)
    # Either way the transaction ends here, which gives its connection back to the pool: the
    # route runs later, on whichever thread of the pool comes free. Held across that wait, a
    # burst of requests would hold every connection while the threads that could finish them
    # wait for one, until the pool's timeout answers them all 503. The route's first query
    # takes a connection again, on the thread that uses it.
    if wrote:
        session.commit()
    else:
        session.rollback()
    return caller


TenantDep = Annotated[Caller, Depends(get_caller)]


def get_admin(caller: TenantDep) -> Caller:
    """The caller, if its key is an admin key; 403 otherwise."""
    if not caller.is_admin:
        raise ApiError(403, "forbidden", "this route needs an admin API key "
                                         "(`tunery keys create --admin`)")
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]


def limit_rate(request: Request, caller: TenantDep) -> None:
    """A router dependency: 429 with Retry-After once the caller's key is over its rate. A
    route among `app.state.job_read_endpoints` (`api.main.JOB_READ_ENDPOINTS`) draws from the
    key's job-reads budget, any other from its general one (`api.limits.rate`)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    route = request.scope.get("route")
    # The route function as its module defines it, under `api.session_route`'s wrapper.
    job_read = (isinstance(route, APIRoute)
                and inspect.unwrap(route.endpoint) in request.app.state.job_read_endpoints)
    wait = limiter.retry_after(caller.key_id, job_read=job_read)
    if wait is not None:
        limit = limiter.limit(job_read=job_read)
        what, setting = (("reads of a job's status, logs, metrics, events or files",
                          "TUNERY_READ_RATE_LIMIT_PER_MINUTE") if job_read
                         else ("requests", "TUNERY_RATE_LIMIT_PER_MINUTE"))
        raise ApiError(429, "rate_limited",
                       f"too many {what} for this API key: at most {limit} per minute "
                       f"({setting}); retry in {wait} s",
                       headers={"Retry-After": str(wait)})


# For `include_router(..., dependencies=[RateLimited])`.
RateLimited = Depends(limit_rate)


async def get_webhook_test_sends(request: Request) -> WebhookTestSends:
    sends: WebhookTestSends = request.app.state.webhook_test_sends
    return sends


WebhookTestSendsDep = Annotated[WebhookTestSends, Depends(get_webhook_test_sends)]


def require_metrics_reader(request: Request, credentials: BearerDep,
                           settings: SettingsDep) -> None:
    """401 or 403 unless the caller may read GET /metrics (`api.metrics.access`)."""
    check_metrics_reader(request, credentials.credentials if credentials else "", settings)


# For the metrics route: Prometheus sends the metrics token, never an API key.
MetricsReader = Depends(require_metrics_reader)
