"""Celery wiring shared by the API (which only sends) and the worker (which consumes).

A message is only a wake-up call: the job row in the database says whether there is work and
who does it (see `shared.jobs.claim_job`). So losing or duplicating a message is harmless.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from shared.settings import Settings, get_settings

TRAIN_TASK = "tunery.train"

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    app = Celery("tunery", broker=settings.broker_url, set_as_current=False)
    transport_options: dict[str, object] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers an unacked message after visibility_timeout; the lease in the
        # database decides who trains, so redelivery only costs a no-op claim.
        transport_options["visibility_timeout"] = 6 * 3600
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.queue_name,
        task_routes={TRAIN_TASK: {"queue": settings.queue_name}},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_training(job_id: str) -> bool:
    """Send the wake-up for a committed job. Returns False (and logs) if the broker is down:
    the job is already stored as QUEUED, so the submission still stands."""
    try:
        get_celery().send_task(TRAIN_TASK, args=[job_id], retry=True,
                               retry_policy={"max_retries": 2, "interval_start": 0.2})
    except Exception:  # noqa: BLE001 - any broker failure must not lose the stored job
        log.exception("could not enqueue job %s; it stays QUEUED", job_id)
        return False
    return True


def check_broker(timeout_s: float = 3.0) -> None:
    """Raise if the broker cannot be reached (readiness probe)."""
    with get_celery().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)
