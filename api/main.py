"""The FastAPI application. `uvicorn api.main:app` or `tunery api`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.access_log import install_access_log_filter
from api.errors import install_error_handlers
from api.limits.install import install_limits
from api.limits.rate import RateLimited
from api.routes import datasets, deploy, finetune, health, me, upload
from shared.private_files import restrict_umask
from shared.queue import declare_queue
from shared.settings import get_settings


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    if settings.auto_migrate:
        from shared.migrate import upgrade_database

        upgrade_database(settings.database_url)
    try:
        declare_queue()
    except Exception:  # noqa: BLE001 - the API serves without a broker; jobs wait as QUEUED
        logging.getLogger("tunery.api").exception("could not declare the training queue")
    yield


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
    app.include_router(finetune.router, dependencies=[RateLimited])
    app.include_router(deploy.router, dependencies=[RateLimited])
    app.include_router(datasets.router, dependencies=[RateLimited])
    app.include_router(me.router, dependencies=[RateLimited])
    # Not rate limited as a whole: its PUT is authorized by the upload token, not a key.
    app.include_router(upload.router)
    install_limits(app)
    return app


app = create_app()
