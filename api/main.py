"""The FastAPI application. `uvicorn api.main:app` or `tunery api`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from api.access_log import install_access_log_filter
from api.dashboard.serve import install_dashboard
from api.deps import RateLimited
from api.errors import install_error_handlers
from api.limits.auth_failures import FailedAuthLimiter
from api.limits.body import RequestBodyLimit
from api.limits.rate import RateLimiter
from api.limits.webhook_tests import WebhookTestSends
from api.metrics.http import RequestMetrics
from api.metrics.processes import forget_this_process
from api.routes import (
    completions,
    datasets,
    deploy,
    deployments,
    exports,
    files,
    fine_tuning,
    finetune,
    health,
    job_stream,
    me,
    metrics,
    models,
    tenants,
    upload,
    webhook_endpoints,
)
from api.uploads import MULTIPART_OVERHEAD
from shared.private_files import restrict_umask
from shared.queue import declare_queue
from shared.settings import get_settings


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    if settings.database.auto_migrate:
        from shared.migrate import upgrade_database

        upgrade_database(settings.database.url)
    try:
        declare_queue()
    except Exception:  # noqa: BLE001 - the API serves without a broker; jobs wait as QUEUED
        logging.getLogger("tunery.api").exception("could not declare the training queue")
    yield
    forget_this_process()


def create_app() -> FastAPI:
    # First, before settings create the data dir: what this process writes (the SQLite
    # database and its -wal, uploads in storage) is for the Tunery user alone.
    restrict_umask()
    app = FastAPI(
        title="Tunery",
        version="0.1.0",
        summary="Self-hosted LoRA / QLoRA fine-tuning with a MonsterAPI-compatible API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_access_log_filter()
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(finetune.router, dependencies=[RateLimited])
    # A stream is one job read for the rate limit, however long it stays open.
    app.include_router(job_stream.router, dependencies=[RateLimited])
    app.include_router(exports.router, dependencies=[RateLimited])
    app.include_router(deploy.router, dependencies=[RateLimited])
    app.include_router(datasets.router, dependencies=[RateLimited])
    app.include_router(me.router, dependencies=[RateLimited])
    app.include_router(tenants.router, dependencies=[RateLimited])
    # OpenAI's dialect over the same jobs and datasets.
    app.include_router(files.router, dependencies=[RateLimited])
    app.include_router(fine_tuning.router, dependencies=[RateLimited])
    app.include_router(models.router, dependencies=[RateLimited])
    app.include_router(completions.router, dependencies=[RateLimited])
    app.include_router(webhook_endpoints.router, dependencies=[RateLimited])
    # A deployment's endpoint: an OpenAI base URL per deployment (`POST /v1/deploy/llm`).
    app.include_router(deployments.router, dependencies=[RateLimited])
    # Not rate limited as a whole: its PUT is authorized by the upload token, not a key.
    app.include_router(upload.router)
    # Last: the page at `/` and its files, which call the routes above.
    install_dashboard(app)
    install_limits(app)
    # Last, so outermost: the limits' own answers (413, 415) are counted too.
    app.add_middleware(RequestMetrics, routes=app.router.routes)
    return app


# The routes that receive dataset files. They stream them to disk under their own
# max_dataset_bytes check; the general limit must not cut them off.
DATASET_UPLOAD_ROUTES = ("upload_dataset", "receive_upload", "upload_file")


# What a client following one job polls, in each face (the monsterapi client follows a job
# through /v1/deploy/status and /v1/deploy/logs): these draw from each key's job-reads budget
# (TUNERY_READ_RATE_LIMIT_PER_MINUTE), every other rate-limited route from its general one.
# Named by their functions, which `api.deps.limit_rate` finds behind the route class's wrapper.
JOB_READ_ENDPOINTS = frozenset({
    finetune.get_job, finetune.job_logs, finetune.job_metrics, job_stream.stream_job,
    deploy.deployment_status, deploy.deployment_logs,
    fine_tuning.get_job, fine_tuning.job_events, files.get_file,
})


def install_limits(app: FastAPI) -> None:
    """The body size middleware, the rate limiter that the `RateLimited` dependency reads
    with the endpoints that draw from its job-reads budget,
    the limiter of failed authentications that `get_caller` and the upload PUT count into,
    and the webhook test sends' own threads and counts.

    The upload routes are found by name in their routers, whose paths carry their prefix:
    the app must include those routers without another one.
    """
    limits = get_settings().limits
    app.state.rate_limiter = RateLimiter(limits.rate_limit_per_minute,
                                         limits.read_rate_limit_per_minute)
    app.state.job_read_endpoints = JOB_READ_ENDPOINTS
    app.state.auth_failure_limiter = FailedAuthLimiter(limits.auth_failures_per_minute)
    app.state.webhook_test_sends = WebhookTestSends()
    uploads = [r for r in (*datasets.router.routes, *upload.router.routes, *files.router.routes)
               if isinstance(r, APIRoute) and r.name in DATASET_UPLOAD_ROUTES]
    if len(uploads) != len(DATASET_UPLOAD_ROUTES):
        raise RuntimeError(f"dataset upload routes {DATASET_UPLOAD_ROUTES} not all found")

    def limit_for(scope: Scope) -> int:
        # Settings are read per request, as the routes read them (SettingsDep).
        settings = get_settings()
        if any(route.matches(scope)[0] == Match.FULL for route in uploads):
            return settings.limits.max_dataset_bytes + MULTIPART_OVERHEAD
        return settings.limits.max_request_bytes

    app.add_middleware(RequestBodyLimit, limit_for=limit_for)


app = create_app()
