"""What waits, read at scrape time: jobs by state and the queue depth of each device class from
the database, the waiting messages of each class's queue from the broker. A scrape never fails
for either being down: each has an `_up` gauge that says whether its numbers could be read."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from shared.db import session_factory
from shared.models import Job, JobStatus
from shared.queue import configured_queues, waiting_messages_by_class
from shared.settings import get_settings

# A scrape waits this long at most for the broker's count (Prometheus' default scrape timeout
# is 10 s); kombu retries a broker that refuses connections for seconds.
BROKER_PATIENCE_S = 2.0
# On PostgreSQL, the longest the jobs count may run before the scrape reports the database
# as down rather than wait.
STATEMENT_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class JobCounts:
    by_state: dict[JobStatus, int]
    """Every state present."""
    queued_by_class: dict[str, int]
    """Claimable QUEUED jobs of every configured class, and of any other class that has one
    (a class an operator removed)."""


def count_jobs() -> JobCounts:
    """Jobs per state and queued jobs per class, in one short session of their own."""
    with session_factory()() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        queued = session.execute(
            select(Job.device_class, func.count())
            .where(Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False))
            .group_by(Job.device_class)).all()
    counts = dict.fromkeys(JobStatus, 0)
    counts.update({JobStatus(status): count for status, count in rows})
    by_class = dict.fromkeys(configured_queues(get_settings()), 0)
    by_class.update({device_class: count for device_class, count in queued})
    return JobCounts(counts, by_class)


class WaitingMessages:
    """The broker's count of undelivered training messages in each class's queue, asked in a
    thread of its own so that a broker that does not answer costs a scrape `patience_s` at
    most. One question at a time: a scrape while the last one is still out waits for that
    one."""

    def __init__(self, count: Callable[[], dict[str, int]] = waiting_messages_by_class,
                 patience_s: float = BROKER_PATIENCE_S) -> None:
        self.count, self.patience_s = count, patience_s
        self._asker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-broker")
        self._asking: Future[dict[str, int]] | None = None
        self._lock = threading.Lock()

    def read(self) -> dict[str, int] | None:
        """The counts by class, or None when the broker did not give them in time."""
        with self._lock:
            if self._asking is None or self._asking.done():
                self._asking = self._asker.submit(self.count)
            asking = self._asking
        try:
            return asking.result(timeout=self.patience_s)
        except Exception:  # noqa: BLE001 - a broker that is down is reported, not raised
            return None


class BacklogCollector(Collector):
    """Gauges read when Prometheus scrapes. Registered only in the registry of the scrape
    itself (`api.metrics.exposition`), so with several API processes they are read once, by
    the process that answers, and never summed."""

    def __init__(self, count_jobs: Callable[[], JobCounts] = count_jobs,
                 waiting: WaitingMessages | None = None) -> None:
        self.count_jobs = count_jobs
        self.waiting = waiting or WaitingMessages()

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._broker()

    def _jobs(self) -> Iterator[Metric]:
        try:
            counts = self.count_jobs()
        except (SQLAlchemyError, OSError):
            counts = None
        yield GaugeMetricFamily(
            "tunery_database_up", "1 when this scrape read the jobs table, 0 when the "
            "database did not answer (the job gauges are then absent).",
            value=0 if counts is None else 1)
        if counts is None:
            return
        jobs = GaugeMetricFamily("tunery_jobs", "Jobs in the database, by state.",
                                 labels=["state"])
        for state, count in counts.by_state.items():
            jobs.add_metric([state.value], count)
        yield jobs
        depth = GaugeMetricFamily(
            "tunery_queue_depth", "Jobs waiting for a worker of their device class as the "
            "database sees them (QUEUED, no cancel asked): the work each class's queue holds, "
            "whatever the broker's messages say.", labels=["device_class"])
        for device_class, count in counts.queued_by_class.items():
            depth.add_metric([device_class], count)
        yield depth

    def _broker(self) -> Iterator[Metric]:
        waiting = self.waiting.read()
        yield GaugeMetricFamily(
            "tunery_broker_up", "1 when this scrape read the broker's queue, 0 when the "
            "broker did not answer in time.", value=0 if waiting is None else 1)
        if waiting is not None:
            messages = GaugeMetricFamily(
                "tunery_broker_waiting_messages", "Wake-up messages in each device class's "
                "queue not yet delivered to a worker.", labels=["device_class"])
            for device_class, count in waiting.items():
                messages.add_metric([device_class], count)
            yield messages
