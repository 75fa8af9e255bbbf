"""The command lines that start Tunery's own processes as children: `tunery up`, the demo,
the end-to-end tests and the benches all start them the same way."""

from __future__ import annotations

import sys

from shared.settings import get_settings


def tunery_command(*args: str) -> list[str]:
    """`tunery ARGS` run with this interpreter, so a child sees the same installation even
    where the `tunery` script is not on PATH."""
    return [sys.executable, "-m", "cli", *args]


def worker_command(queues: str | None = None) -> list[str]:
    """A Celery training worker consuming `queues` (default: the configured queue)."""
    settings = get_settings()
    # One job per process (solo pool): a training job owns the GPU. Gossip and mingle use
    # broadcast exchanges that the embedded SQLite transport does not provide.
    return [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", "--pool", "solo",
            "--concurrency", "1", "-Q", queues or settings.broker.queue_name, "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]
