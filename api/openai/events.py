"""A job's events as OpenAI lists them (`fine_tuning.job.event`), read from the rows Tunery
already writes: its status changes (`job_events`), its log lines (`job_logs`) and its metrics
(`job_metrics`). Nothing is written twice to be listed.

Newest first across the three tables, by (time, table, row id, part): a row may read as
several events (a job's creation is "Validating training file" then "Files validated"), each
with its own id, so that `after` resumes exactly where the last page ended.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, false, or_, select, true
from sqlalchemy.orm import Session

from api.feed_stream import sse_event
from api.openai.ids import EventKey
from api.openai.job_view import epoch, job_object
from api.openai.schemas import JobEvent as EventOut
from shared.job_feed import INSTANT_RANK as _RANK
from shared.job_feed import ROW_TABLES as _TABLES
from shared.job_feed import FeedPage, source_of
from shared.models import Job, JobEvent, JobMetric, JobStatus


class UnknownCursor(LookupError):
    """`after` names no event of this job."""


@dataclass(frozen=True)
class _Event:
    at: datetime
    key: EventKey
    out: EventOut

    @property
    def order(self) -> tuple[datetime, int, int, int]:
        return (self.at, _RANK[self.key.source], self.key.row_id, self.key.part)


def list_events(session: Session, job: Job, *, after: EventKey | None, limit: int,
                model_name: Callable[[], str]) -> tuple[list[EventOut], bool]:
    """One page of `job`'s events, newest first, after the event `after`, and whether more
    follow. `model_name` names the fine-tuned model, for the completion's message."""
    cursor: tuple[datetime, int, int, int] | None = None
    if after is not None:
        table = _TABLES[after.source]
        at = session.scalar(select(table.at).where(table.id == after.row_id,
                                                   table.job_id == job.id))
        if at is None:
            raise UnknownCursor(after.id)
        cursor = (at, _RANK[after.source], after.row_id, after.part)
    found: list[_Event] = []
    for source, table in _TABLES.items():
        where: list[ColumnElement[bool]] = [table.job_id == job.id]
        if cursor is not None:
            where.append(_not_after(table, source, cursor))
        rows = session.scalars(select(table).where(*where)
                               .order_by(table.at.desc(), table.id.desc()).limit(limit + 2))
        for row in rows:
            found.extend(_events_of(source, row, job, model_name))
    found.sort(key=lambda e: e.order, reverse=True)
    if cursor is not None:
        found = [e for e in found if _comparable(e.order) < _comparable(cursor)]
    return [e.out for e in found[:limit]], len(found) > limit


class StreamedEvents:
    """A page of the job's feed as the stream of `?stream=true` sends it: each event as
    `data: {event}`, oldest first, and `data: [DONE]` after the last page, as OpenAI's legacy
    fine-tune event streams ended. A row's last event carries the feed's cursor as its SSE id,
    so that an EventSource that reconnects goes on after that row."""

    def __init__(self, organization: str) -> None:
        self.organization = organization

    def __call__(self, page: FeedPage) -> str:
        job = page.job

        def model_name() -> str:
            return job_object(job, self.organization).fine_tuned_model or ""

        parts = []
        cursor = page.after
        for row in page.rows:
            cursor = cursor.after(row)
            events = _events_of(source_of(row), row, job, model_name)
            for i, event in enumerate(events):
                last = i == len(events) - 1
                parts.append(sse_event(event.out.model_dump_json(),
                                       event_id=str(cursor) if last else None))
        if page.ended:
            parts.append(sse_event("[DONE]"))
        return "".join(parts)


def _not_after(table: Any, source: str, cursor: tuple[datetime, int, int, int]
               ) -> ColumnElement[bool]:
    at, rank, row_id, _part = cursor
    same_instant: ColumnElement[bool] = (
        true() if _RANK[source] < rank else table.id <= row_id if _RANK[source] == rank
        else false())
    return or_(table.at < at, and_(table.at == at, same_instant))


def _comparable(order: tuple[datetime, int, int, int]) -> tuple[float, int, int, int]:
    # SQLite gives naive datetimes and PostgreSQL aware ones; compare instants.
    at = order[0]
    stamp = at.timestamp() if at.tzinfo else at.replace(tzinfo=None).timestamp()
    return (stamp, *order[1:])


def _events_of(source: str, row: Any, job: Job, model_name: Callable[[], str]) -> list[_Event]:
    if source == "s":
        messages = _status_messages(row, job, model_name)
    elif source == "l":
        messages = [(_log_level(row.line), row.line, "message", None)]
    else:
        messages = [_metrics_message(row)]
    return [
        _Event(row.at, key := EventKey(source, row.id, part), EventOut(
            id=key.id, created_at=epoch(row.at) or 0, level=level, message=message,
            type=kind, data=data))
        for part, (level, message, kind, data) in enumerate(messages)
    ]


Message = tuple[str, str, str, dict[str, Any] | None]


def _status_messages(row: JobEvent, job: Job, model_name: Callable[[], str]) -> list[Message]:
    """OpenAI's words for a status change, oldest first."""
    to, reason = row.to_status, row.reason or ""
    if row.from_status is None:
        fields = job.openai or {}
        files = fields.get("training_file") or job.payload.get("data_config", {}).get(
            "data_path", "")
        if fields.get("validation_file"):
            files += f" and validation file: {fields['validation_file']}"
        validating: list[Message] = [("info", f"Validating training file: {files}", "message",
                                      None)]
        if _failed_validation(job):
            return validating
        return [*validating,
                ("info", "Files validated, moving job to queued state", "message", None)]
    if to == JobStatus.RUNNING.value:
        text = ("Fine-tuning job started" if row.attempt <= 1
                else f"Fine-tuning job resumed (attempt {row.attempt})")
        return [("info", text, "message", None)]
    if to == JobStatus.COMPLETED.value:
        return [("info", f"New fine-tuned model created: {model_name()}", "message", None),
                ("info", "The job has successfully completed", "message", None)]
    if to == JobStatus.FAILED.value:
        if _failed_validation(job) and row.attempt == 0:
            return [("error", f"File validation failed: {reason}", "message", None)]
        return [("error", f"Fine-tuning job failed: {reason}", "message", None)]
    if to == JobStatus.CANCELLED.value:
        return [("info", "Fine-tuning job cancelled", "message", None)]
    if to == JobStatus.PAUSED.value:
        return [("info", "Fine-tuning job paused", "message", None)]
    if to == JobStatus.QUEUED.value and row.from_status == JobStatus.PAUSED.value:
        return [("info", "Fine-tuning job resumed, moving job to queued state", "message", None)]
    return [("warn", f"Job re-queued: {reason}" if reason else "Job re-queued", "message", None)]


def _failed_validation(job: Job) -> bool:
    """Whether the job failed the check of its files, before it was ever queued."""
    return (job.status == JobStatus.FAILED.value and job.started_at is None
            and (job.error_code or "").startswith("invalid_"))


def _log_level(line: str) -> str:
    lowered = line.lower()
    if lowered.startswith("failed"):
        return "error"
    return "warn" if lowered.startswith("warning") else "info"


def _metrics_message(row: JobMetric) -> Message:
    values = row.values
    total = int(values["total_steps"]) if "total_steps" in values else None
    data: dict[str, Any] = {"step": row.step}
    if total is not None:
        data["total_steps"] = total
    parts = []
    for name, key in (("train_loss", "loss"), ("valid_loss", "eval_loss"),
                      ("train_mean_token_accuracy", "mean_token_accuracy"),
                      ("valid_mean_token_accuracy", "eval_mean_token_accuracy")):
        if key in values:
            data[name] = values[key]
    if "train_loss" in data:
        parts.append(f"training loss={data['train_loss']:.4f}")
    if "valid_loss" in data:
        parts.append(f"validation loss={data['valid_loss']:.4f}")
    step = f"Step {row.step}/{total}" if total else f"Step {row.step}"
    return ("info", f"{step}: {', '.join(parts) or 'metrics'}", "metrics", data)
