"""The command lines that start Tunery's own processes as children: `tunery up`, the demo,
the end-to-end tests and the benches all start them the same way."""

from __future__ import annotations

import sys

from shared.queue import worker_queue
from shared.settings import get_settings

# Where `tunery inference` listens unless told otherwise: the port of the default
# `inference.engine_url`.
DEFAULT_ENGINE_PORT = 8089


def tunery_command(*args: str) -> list[str]:
    """`tunery ARGS` run with this interpreter, so a child sees the same installation even
    where the `tunery` script is not on PATH."""
    return [sys.executable, "-m", "cli", *args]


def worker_command(quiet: bool = False) -> list[str]:
    """A Celery training worker consuming its device class's queue (TUNERY_WORKER_DEVICE_CLASS,
    default the first class), started through `cli.celery_worker` (each distinct warning
    once); a `quiet` one prints no banner and only warnings and errors."""
    banner = ["--quiet"] if quiet else []
    # One job per process: a training job owns the GPU. No --pool: `worker.tasks` configures
    # its solo pool, which hands the job back on a cold shutdown (`worker.solo_pool`). Gossip
    # and mingle use broadcast exchanges that the embedded SQLite transport does not provide.
    # One queue, never a list: the worker claims only its own class's jobs, so a wake-up it
    # took from another class's queue would be lost to that class.
    return [sys.executable, "-m", "cli.celery_worker", "-A", "worker.tasks", *banner, "worker",
            "--concurrency", "1", "-Q", worker_queue(get_settings()),
            "--loglevel", "WARNING" if quiet else "INFO", "--without-gossip", "--without-mingle"]
