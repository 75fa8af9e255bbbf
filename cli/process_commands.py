"""The command lines that start Tunery's own processes as children: `tunery up`, the demo,
the end-to-end tests and the benches all start them the same way."""

from __future__ import annotations

import sys

from shared.settings import get_settings

# Where `tunery inference` listens unless told otherwise: the port of the default
# `inference.engine_url`.
DEFAULT_ENGINE_PORT = 8089


def tunery_command(*args: str) -> list[str]:
    """`tunery ARGS` run with this interpreter, so a child sees the same installation even
    where the `tunery` script is not on PATH."""
    return [sys.executable, "-m", "cli", *args]


def worker_command(queues: str | None = None, quiet: bool = False) -> list[str]:
    """A Celery training worker consuming `queues` (default: the configured queue), started
    through `cli.celery_worker` (each distinct warning once); a `quiet` one prints no banner
    and only warnings and errors."""
    settings = get_settings()
    banner = ["--quiet"] if quiet else []
    # One job per process: a training job owns the GPU. No --pool: `worker.tasks` configures
    # its solo pool, which hands the job back on a cold shutdown (`worker.solo_pool`). Gossip
    # and mingle use broadcast exchanges that the embedded SQLite transport does not provide.
    return [sys.executable, "-m", "cli.celery_worker", "-A", "worker.tasks", *banner, "worker",
            "--concurrency", "1", "-Q", queues or settings.broker.queue_name,
            "--loglevel", "WARNING" if quiet else "INFO", "--without-gossip", "--without-mingle"]
