"""A job's feed: its status changes (`job_events`), log lines (`job_logs`) and metrics
(`job_metrics`) as one sequence, read page by page after a cursor.

The cursor is the last row id seen in each of the three tables (`s12.l340.m56`). Each table's
ids grow in the order its rows are committed for one job (see `shared.jobs.logs_after` and
`events_after`), so rows above the cursor are exactly the rows not read yet: a reader that
keeps the cursor of the last row it handed on misses nothing and reads nothing twice, whatever
the order it reads the three tables in.

Within a page the rows of the three tables are merged by time, so that a follower reads a
step's metrics, its log line and a status change in the order they happened.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from shared import jobs
from shared.models import TERMINAL_STATUSES, Job, JobEvent, JobLog, JobMetric, JobStatus
from shared.tenancy import Scope

FeedRow = JobEvent | JobLog | JobMetric

ROW_TABLES: dict[str, type[JobEvent] | type[JobLog] | type[JobMetric]] = {
    "s": JobEvent, "l": JobLog, "m": JobMetric}
"""The letter that names each table in a cursor (and in the OpenAI dialect's event ids)."""

INSTANT_RANK = {"m": 0, "l": 1, "s": 2}
"""Among rows written in the same instant: metrics, then the log line that reports them,
then a status change (a job completes after its last step is logged)."""
_CURSOR = re.compile(r"s([0-9]{1,10})\.l([0-9]{1,10})\.m([0-9]{1,10})")

PAGE_ROWS = 500
"""Rows read from each table per page: what one short read holds in memory."""


class MalformedCursor(ValueError):
    """A cursor that `FeedCursor.parse` cannot read."""


def source_of(row: FeedRow) -> str:
    """The letter of the table `row` comes from."""
    if isinstance(row, JobEvent):
        return "s"
    return "l" if isinstance(row, JobLog) else "m"


@dataclass(frozen=True)
class FeedCursor:
    """Where a reader of the feed stands: the last row id it has seen in each table (0: none
    yet). Opaque to clients: they hand back the text they were given."""

    status: int = 0
    log: int = 0
    metric: int = 0

    def __str__(self) -> str:
        return f"s{self.status}.l{self.log}.m{self.metric}"

    @classmethod
    def parse(cls, text: str) -> FeedCursor:
        match = _CURSOR.fullmatch(text.strip())
        if match is None:
            raise MalformedCursor(f"{text[:80]!r} is not a cursor this server handed out (such "
                                  "as 's12.l340.m56'); send back the last event id received")
        ids = [int(part) for part in match.groups()]
        # The ids are 32-bit INTEGER columns: PostgreSQL refuses a larger number even in a
        # comparison.
        if any(row_id > jobs.MAX_LOG_ID for row_id in ids):
            raise MalformedCursor(f"{text[:80]!r} names a row id beyond any this server has")
        return cls(*ids)

    def after(self, row: FeedRow) -> FeedCursor:
        """This cursor moved past `row`."""
        source = source_of(row)
        if source == "s":
            return replace(self, status=max(self.status, row.id))
        if source == "l":
            return replace(self, log=max(self.log, row.id))
        return replace(self, metric=max(self.metric, row.id))


@dataclass(frozen=True)
class FeedPage:
    job: Job
    """The job as it was just before its rows were read."""
    after: FeedCursor
    """The cursor the page was read after."""
    rows: list[FeedRow]
    """Rows after `after`, oldest first: the cursor after the i-th is `after` moved past it
    and every row before it."""
    cursor: FeedCursor
    """The cursor after the last of `rows` (the one asked for when there are none)."""
    drained: bool
    """No row was left unread when the page was read: the next page waits for new rows."""

    @property
    def ended(self) -> bool:
        """The job is finished and every row it wrote is in this page or an earlier one: its
        feed has nothing more to tell."""
        return self.drained and JobStatus(self.job.status) in TERMINAL_STATUSES


def read_feed(session: Session, scope: Scope, job_id: str, after: FeedCursor,
              limit: int = PAGE_ROWS) -> FeedPage:
    """The page of `job_id`'s feed after `after`: at most `limit` rows of each table, merged
    by time. Raises `shared.jobs.JobNotFound` when `scope` may not see the job.

    The job is read before its rows: a status it reports as finished was committed with, or
    after, every row the job's run wrote, so a page that finds it finished and drained is the
    feed's last.
    """
    job = jobs.get_job(session, scope, job_id)
    batches: list[list[FeedRow]] = [
        [*jobs.events_after(session, job.id, after.status, limit)],
        [*jobs.logs_after(session, job.id, after.log, limit)],
        [*jobs.metrics_after(session, job.id, after.metric, limit)],
    ]
    rows = _merge(batches, limit)
    cursor = after
    for row in rows:
        cursor = cursor.after(row)
    drained = all(len(batch) < limit for batch in batches)
    return FeedPage(job=job, after=after, rows=rows, cursor=cursor, drained=drained)


def _merge(batches: list[list[FeedRow]], limit: int) -> list[FeedRow]:
    """The rows of `batches` (each in id order) oldest first, each batch's own order kept so
    that the cursor after any row covers every row before it.

    A full batch may have more rows in the database than were read: the merge stops after its
    last row, since the next one might be older than what the other batches would add.
    """
    queues = [deque(batch) for batch in batches]
    merged: list[FeedRow] = []
    while any(queues):
        index = min((i for i, q in enumerate(queues) if q), key=lambda i: _order(queues[i][0]))
        merged.append(queues[index].popleft())
        if not queues[index] and len(batches[index]) >= limit:
            break
    return merged


def _order(row: FeedRow) -> tuple[float, int, int]:
    return (_instant(row.at), INSTANT_RANK[source_of(row)], row.id)


def _instant(at: datetime) -> float:
    # SQLite gives naive datetimes (written in UTC) and PostgreSQL aware ones; compare instants.
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
