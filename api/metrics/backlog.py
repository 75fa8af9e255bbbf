"""What waits, read at scrape time: jobs by state and the queue depth from the database, the
waiting messages from the broker. A scrape never fails for either being down: each has an
`_up` gauge that says whether its numbers could be read."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from shared.db import session_factory
from shared.models import Job, JobStatus
from shared.queue import count_waiting_messages

# A scrape waits this long at most for the broker's count (Prometheus' default scrape timeout
# is 10 s); kombu retries a broker that refuses connections for seconds.
BROKER_PATIENCE_S = 2.0
# On PostgreSQL, the longest the jobs count may run before the scrape reports the database
# as down rather than wait.
STATEMENT_TIMEOUT_MS = 2000


def count_jobs_by_state() -> dict[JobStatus, int]:
    """Jobs per state, every state present; in one short session of its own."""
    with session_factory()() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counts = dict.fromkeys(JobStatus, 0)
    counts.update({JobStatus(status): count for status, count in rows})
    return counts


class WaitingMessages:
    """The broker's count of undelivered training messages, asked in a thread of its own so
    that a broker that does not answer costs a scrape `patience_s` at most. One question at a
    time: a scrape while the last one is still out waits for that one."""

    def __init__(self, count: Callable[[], int] = count_waiting_messages,
                 patience_s: float = BROKER_PATIENCE_S) -> None:
        self.count, self.patience_s = count, patience_s
        self._asker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-broker")
        self._asking: Future[int] | None = None
        self._lock = threading.Lock()

    def read(self) -> int | None:
        """The count, or None when the broker did not give it in time."""
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

    def __init__(self, count_jobs: Callable[[], dict[JobStatus, int]] = count_jobs_by_state,
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
        for state, count in counts.items():
            jobs.add_metric([state.value], count)
        yield jobs
        yield GaugeMetricFamily(
            "tunery_queue_depth", "Jobs waiting for a worker as the database sees them "
            "(QUEUED): the work the queue holds, whatever the broker's messages say.",
            value=counts[JobStatus.QUEUED])

    def _broker(self) -> Iterator[Metric]:
        waiting = self.waiting.read()
        yield GaugeMetricFamily(
            "tunery_broker_up", "1 when this scrape read the broker's queue, 0 when the "
            "broker did not answer in time.", value=0 if waiting is None else 1)
        if waiting is not None:
            yield GaugeMetricFamily(
                "tunery_broker_waiting_messages", "Wake-up messages in the training queue "
                "not yet delivered to a worker.", value=waiting)
