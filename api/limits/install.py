"""Wiring the request body limit and the rate limiter into the app."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from api.limits.auth_failures import FailedAuthLimiter
from api.limits.body import RequestBodyLimit
from api.limits.rate import RateLimiter
from api.routes import datasets, upload
from api.uploads import MULTIPART_OVERHEAD
from shared.settings import get_settings

# The routes that receive dataset files. They stream them to disk under their own
# max_dataset_bytes check; the general limit must not cut them off.
DATASET_UPLOAD_ROUTES = ("upload_dataset", "receive_upload")


def install_limits(app: FastAPI) -> None:
    """The body size middleware, the rate limiter that the `RateLimited` dependency reads, and
    the limiter of failed authentications that `get_caller` and the upload PUT count into.

    The upload routes are found by name in their routers, whose paths carry their prefix:
    the app must include those routers without another one.
    """
    app.state.rate_limiter = RateLimiter(get_settings().rate_limit_per_minute)
    app.state.auth_failure_limiter = FailedAuthLimiter(get_settings().auth_failures_per_minute)
    uploads = [r for r in (*datasets.router.routes, *upload.router.routes)
               if isinstance(r, APIRoute) and r.name in DATASET_UPLOAD_ROUTES]
    if len(uploads) != len(DATASET_UPLOAD_ROUTES):
        raise RuntimeError(f"dataset upload routes {DATASET_UPLOAD_ROUTES} not all found")

    def limit_for(scope: Scope) -> int:
        # Settings are read per request, as the routes read them (SettingsDep).
        settings = get_settings()
        if any(route.matches(scope)[0] == Match.FULL for route in uploads):
            return settings.max_dataset_bytes + MULTIPART_OVERHEAD
        return settings.max_request_bytes

    app.add_middleware(RequestBodyLimit, limit_for=limit_for)
