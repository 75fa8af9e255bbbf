"""Celery wiring shared by the API (which only sends) and the worker (which consumes).

A message is only a wake-up call: the job row in the database says whether there is work and
who does it (see `shared.jobs.claim_job`). So losing or duplicating a message is harmless.

There is one queue per device class (`shared.device_classes`), named as the class: a job's
wake-ups go to its class's queue, and a worker consumes its own class's queue alone
(`worker_queue`).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.utils.uuid import uuid

from shared.settings import Settings, get_settings

TRAIN_TASK = "tunery.train"
EXPORT_TASK = "tunery.export"

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    app = Celery("tunery", broker=settings.broker.url, set_as_current=False)
    transport_options: dict[str, object] = {}
    if settings.broker.url.startswith(("redis://", "rediss://")):
        transport_options["visibility_timeout"] = visibility_timeout_s(settings)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        # The queue a worker consumes when no -Q names one; every send names its queue.
        task_default_queue=worker_queue(settings),
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def visibility_timeout_s(settings: Settings) -> int:
    """How long Redis keeps a delivered, unacknowledged message before it delivers it again.

    A training task holds its message unacked until it ends (acks_late), so a dead worker's
    message comes back after this long, and a running job's message comes back every this
    long. Both are harmless: a message is only a wake-up, and the worker it reaches claims the
    fairest queued job or nothing (`shared.jobs.claim_next`); the job it was sent for is held
    by its lease and fenced on its attempt, so it never trains twice. Kept short (ten leases,
    five minutes by default) so that no dead worker's message lingers in Redis for a day, and
    long enough that a running job's message is not redelivered on every sweep.
    """
    return max(10 * settings.leases.lease_seconds, 60)


def worker_queue(settings: Settings) -> str:
    """The queue this process consumes as a worker: its device class's
    (`TUNERY_WORKER_DEVICE_CLASS`)."""
    return settings.broker.worker_class().name


def class_queue(device_class: str) -> Queue:
    """The queue of `device_class`, as Celery makes a queue it is only given the name of:
    named as the class, on a direct exchange of the same name. Built here rather than looked
    up in the app's queues, which would add it there, and a worker started without -Q
    consumes every queue the app holds."""
    return Queue(device_class, Exchange(device_class), routing_key=device_class)


def configured_queues(settings: Settings) -> list[str]:
    """The queues of every configured device class, in the order they are listed."""
    return [device_class.name for device_class in settings.broker.device_classes]


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    return make_celery(get_settings())


def declare_queue(attempts: int = 3) -> None:
    """Create the queue of every device class on the broker, tolerating a concurrent creator.

    kombu's SQLAlchemy transport creates a queue row with a get-or-create that is guarded only
    within one process: an API and a worker declaring the queue at the same moment make one of
    them fail with a UNIQUE violation and leave its session unusable (the first submission
    after `tunery up` would never be delivered). Declaring at start-up, with a fresh
    connection per retry, means the unguarded declares inside Celery find the row already there.
    """
    for attempt in range(1, attempts + 1):
        app = get_celery()
        try:
            with app.connection_for_write() as connection:
                for name in configured_queues(get_settings()):
                    class_queue(name)(connection.default_channel).declare()
            return
        except Exception:
            if attempt == attempts:
                raise
            get_celery.cache_clear()
            time.sleep(0.2 * attempt)


class RedisWakeUps:
    """Sends `train(job_id)` on a Redis broker for under a third of `send_task`'s CPU.

    The message is the one Celery builds (`create_task_message`); only the last step, which
    kombu's Redis transport does for a message to the default exchange, is done here: the
    body base64-encoded into kombu's JSON envelope and LPUSHed to the list named after the
    class's queue (`make_celery` sets no key prefix and no priorities, so that is the whole
    key: the list KEDA watches), on
    one redis-py client kept for the process (safe to share between threads). What it skips
    is routing, signals, a pooled producer wrapped in a retry, and a new redis-py client
    object per message inside kombu. `tests/shared/test_queue.py` holds
    this envelope to the one kombu writes.
    """

    def __init__(self, app: Celery) -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.app = app
        timeout = app.conf.broker_connection_timeout
        # As kombu's Redis transport connects, plus a socket timeout: a request must not
        # hang on a broker that stopped answering. Retried as send_task was: twice more,
        # 0.2 s and 0.4 s later, before `enqueue_training` starts afresh.
        self.client = redis.Redis.from_url(
            app.conf.broker_url, socket_connect_timeout=timeout, socket_timeout=timeout,
            health_check_interval=25, retry=Retry(ExponentialBackoff(cap=0.4, base=0.1), 2),
        )

    def message(self, job_id: str, queue: str) -> dict[str, Any]:
        """The message as kombu's Redis transport stores it."""
        task_id = uuid()
        headers, properties, body, _ = self.app.amqp.create_task_message(
            task_id, TRAIN_TASK, [job_id], {}, reply_to=self.app.thread_oid, ignore_result=None,
        )
        return {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,  # persistent, as Celery sends every task
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": uuid(),
            },
        }

    def send(self, job_id: str, queue: str) -> None:
        self.client.lpush(queue, json.dumps(self.message(job_id, queue)))


@lru_cache(maxsize=1)
def wake_up_sender(app: Celery) -> Callable[[str, str], None]:
    """How this process sends a wake-up (job id, queue) on `app`'s broker: straight to Redis
    when the broker is a plain `redis://` URL, through `send_task` on any other (the embedded
    transport)."""
    if app.conf.broker_url.startswith("redis://"):
        return RedisWakeUps(app).send

    def send_task(job_id: str, queue: str) -> None:
        app.send_task(TRAIN_TASK, args=[job_id], queue=class_queue(queue), retry=True,
                      retry_policy={"max_retries": 2, "interval_start": 0.2})

    return send_task


def enqueue_training(job_id: str, device_class: str, attempts: int = 3) -> bool:
    """Send the wake-up for a committed job to the queue of `device_class`, the class it was
    routed to (`Job.device_class`). Returns False (and logs) if the broker stays unreachable:
    the job is already stored as QUEUED, so the submission still stands."""
    for attempt in range(1, attempts + 1):
        try:
            wake_up_sender(get_celery())(job_id, device_class)
            return True
        except Exception:  # noqa: BLE001 - any broker failure must not lose the stored job
            if attempt == attempts:
                log.exception("could not enqueue job %s; it stays QUEUED", job_id)
                return False
            log.warning("enqueue of job %s failed (attempt %d); retrying on a new connection",
                        job_id, attempt, exc_info=True)
            # A failed publish can leave the connection's session unusable: start afresh (a
            # new app gets a new sender).
            get_celery.cache_clear()
            time.sleep(0.2 * attempt)
    return False


def enqueue_export(export_id: str, device_class: str | None = None, attempts: int = 3) -> bool:
    """Send `export(export_id)` for a committed export to the queue of `device_class`, its
    job's class: merging the adapter into the base model needs the memory the job needed.
    None: this process's own class, which is the job's where a worker queues the exports of
    the job it just trained (a worker claims jobs of its own class only). Returns False (and
    logs) if the broker stays unreachable: the export stays QUEUED, and asking for it again
    sends another (a duplicate claims nothing)."""
    queue = device_class if device_class is not None else worker_queue(get_settings())
    for attempt in range(1, attempts + 1):
        try:
            get_celery().send_task(EXPORT_TASK, args=[export_id], queue=class_queue(queue),
                                   retry=True,
                                   retry_policy={"max_retries": 2, "interval_start": 0.2})
            return True
        except Exception:  # noqa: BLE001 - any broker failure must not lose the stored export
            if attempt == attempts:
                log.exception("could not enqueue export %s; it stays QUEUED", export_id)
                return False
            get_celery.cache_clear()
            time.sleep(0.2 * attempt)
    return False


def count_waiting_messages(device_class: str) -> int:
    """Messages in the queue of `device_class` not yet delivered to a worker."""
    with get_celery().connection_for_write() as connection:
        return _waiting(connection, device_class)


def waiting_messages_by_class() -> dict[str, int]:
    """`count_waiting_messages` of every configured class, on one connection."""
    with get_celery().connection_for_write() as connection:
        return {name: _waiting(connection, name) for name in configured_queues(get_settings())}


def _waiting(connection: Any, device_class: str) -> int:
    # Redis, the embedded transport and RabbitMQ all report the count on a queue declare.
    declared = class_queue(device_class)(connection.default_channel).queue_declare()
    return int(declared.message_count) if declared is not None else 0


def check_broker(timeout_s: float = 3.0) -> None:
    """Raise if the broker cannot be reached (readiness probe)."""
    with get_celery().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)
