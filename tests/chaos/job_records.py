"""What the database says happened to a job: its row, events, metrics and log lines.

Read straight from PostgreSQL, not through the proxy the services use, so a test can watch
while it cuts their database off. Plain SQL on purpose: these are the tables the issue names,
read as an operator would read them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
_RESUMED = re.compile(r"resumed from step (\d+)")
_CHECKPOINT = re.compile(r"checkpoint at step (\d+) saved")


@dataclass(frozen=True)
class Event:
    from_status: str | None
    to_status: str
    attempt: int
    reason: str | None
    at: datetime


@dataclass(frozen=True)
class StatusChange:
    """A job event with its job's tenant, for orderings across jobs."""

    job_id: str
    tenant_id: str
    to_status: str
    attempt: int
    at: datetime


@dataclass(frozen=True)
class Metric:
    attempt: int
    step: int
    values: dict[str, Any]
    at: datetime


@dataclass(frozen=True)
class LogLine:
    attempt: int
    line: str
    at: datetime


@dataclass(frozen=True)
class JobTrace:
    """One job's row and history, read at one moment."""

    row: dict[str, Any]
    events: list[Event]
    metrics: list[Metric]
    logs: list[LogLine]

    @property
    def job_id(self) -> str:
        return str(self.row["id"])

    @property
    def status(self) -> str:
        return str(self.row["status"])

    @property
    def attempt(self) -> int:
        return int(self.row["attempt"])

    def training_metrics(self, attempt: int | None = None) -> list[Metric]:
        """Metrics of optimizer steps (they carry a loss), optionally of one attempt."""
        return [m for m in self.metrics
                if "loss" in m.values and (attempt is None or m.attempt == attempt)]

    def trained_steps(self, attempt: int) -> list[int]:
        return [m.step for m in self.training_metrics(attempt)]

    def attempts_that_trained(self) -> list[int]:
        return sorted({m.attempt for m in self.training_metrics()})

    def planned_steps(self) -> int | None:
        """The run's total optimizer steps, as the Trainer planned them (`total_steps`)."""
        for metric in self.training_metrics():
            if "total_steps" in metric.values:
                return int(metric.values["total_steps"])
        return None

    def resumed_from(self, attempt: int) -> int | None:
        """The step the attempt said it resumed from, or None if it started afresh."""
        for log in self.logs:
            if log.attempt == attempt and (match := _RESUMED.search(log.line)):
                return int(match[1])
        return None

    def checkpoints_saved(self, attempt: int) -> list[int]:
        return [int(match[1]) for log in self.logs
                if log.attempt == attempt and (match := _CHECKPOINT.search(log.line))]

    def claims(self) -> list[Event]:
        return [e for e in self.events if e.to_status == "RUNNING"]

    def events_to(self, status: str) -> list[Event]:
        return [e for e in self.events if e.to_status == status]

    def log_lines(self, attempt: int | None = None) -> list[str]:
        return [log.line for log in self.logs if attempt is None or log.attempt == attempt]

    def summary(self) -> str:
        """A compact picture for assertion messages."""
        events = "; ".join(f"{e.from_status}->{e.to_status}#{e.attempt} ({e.reason})"
                           for e in self.events)
        steps = {a: self.trained_steps(a) for a in self.attempts_that_trained()}
        return (f"job {self.job_id} {self.status} attempt {self.attempt} "
                f"error={self.row['error']!r} lease_owner={self.row['lease_owner']} "
                f"events=[{events}] steps={steps} "
                f"last logs={self.log_lines()[-6:]}")


class JobsDatabase:
    """Read-only access to one test's Tunery database."""

    def __init__(self, url: str) -> None:
        # NullPool: no idle connection of ours outlives a query, so none holds up the drop.
        self.engine: Engine = create_engine(url, poolclass=NullPool)

    def job_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT id FROM jobs ORDER BY created_at"))
            return [str(r[0]) for r in rows]

    def row(self, job_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            found = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id})
            row = found.mappings().one_or_none()
        if row is None:
            raise AssertionError(f"no job {job_id} in the database")
        return dict(row)

    def status(self, job_id: str) -> tuple[str, int]:
        row = self.row(job_id)
        return str(row["status"]), int(row["attempt"])

    def trace(self, job_id: str) -> JobTrace:
        with self.engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id})
            job = row.mappings().one()
            events = [Event(*r[:4], _moment(r[4])) for r in conn.execute(text(
                "SELECT from_status, to_status, attempt, reason, at FROM job_events "
                "WHERE job_id = :id ORDER BY id"), {"id": job_id})]
            metrics = [Metric(r[0], r[1], _values(r[2]), _moment(r[3])) for r in conn.execute(
                text("SELECT attempt, step, \"values\", at FROM job_metrics "
                     "WHERE job_id = :id ORDER BY id"), {"id": job_id})]
            logs = [LogLine(r[0], r[1], _moment(r[2])) for r in conn.execute(text(
                "SELECT attempt, line, at FROM job_logs WHERE job_id = :id ORDER BY id"),
                {"id": job_id})]
        return JobTrace(dict(job), events, metrics, logs)

    def status_changes(self) -> list[StatusChange]:
        """Every job's status changes, in the order they were written (event id)."""
        with self.engine.connect() as conn:
            return [StatusChange(*r) for r in conn.execute(text(
                "SELECT e.job_id, j.tenant_id, e.to_status, e.attempt, e.at "
                "FROM job_events e JOIN jobs j ON j.id = e.job_id ORDER BY e.id"))]

    def dispose(self) -> None:
        self.engine.dispose()


def _moment(value: datetime | str) -> datetime:
    """A stored time as an aware UTC datetime: PostgreSQL gives one; SQLite, read with plain
    SQL, gives the naive UTC text SQLAlchemy wrote."""
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _values(value: dict[str, Any] | str) -> dict[str, Any]:
    """A metric's values: PostgreSQL's JSON comes decoded, SQLite's as its text."""
    return json.loads(value) if isinstance(value, str) else value
