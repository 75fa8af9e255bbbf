"""The job state machine and every write to a job row.

Status changes go through `transition()` only: it checks the move against `ALLOWED`, fences on
the attempt number so a stale worker cannot overwrite a newer attempt, and records an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from shared.models import (
    TERMINAL_STATUSES,
    Job,
    JobEvent,
    JobLog,
    JobMetric,
    JobStatus,
    utcnow,
)
from shared.schema import FinetuneRequest

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    # RUNNING -> QUEUED is the lease-expiry path: the worker died and attempts remain.
    JobStatus.RUNNING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

PHASES = ("loading_data", "loading_model", "training", "uploading")

MAX_LOG_LINE = 4000


class JobNotFound(LookupError):
    pass


class JobConflict(Exception):
    """The job is in a state where the requested action makes no sense (e.g. cancel a
    completed job)."""


class IllegalTransition(Exception):
    pass


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    owner: str


def create_job(
    session: Session, tenant_id: str, request: FinetuneRequest, max_attempts: int
) -> Job:
    job = Job(
        tenant_id=tenant_id,
        status=JobStatus.QUEUED.value,
        payload=request.model_dump(mode="json"),
        base_model=request.pretrainedmodel_config.model_path,
        max_attempts=max_attempts,
    )
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, from_status=None, to_status=job.status, attempt=0))
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job; another tenant's job is indistinguishable from a missing one."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise JobNotFound(job_id)
    return job


def list_jobs(session: Session, tenant_id: str, limit: int, offset: int) -> tuple[list[Job], int]:
    total = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))
    jobs = session.scalars(
        select(Job)
        .where(Job.tenant_id == tenant_id)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(jobs), total or 0


def claim_job(session: Session, job_id: str, owner: str, lease_seconds: int) -> Claim | None:
    """Take the job for one attempt, or return None if someone else holds it or it is done.

    One conditional UPDATE decides, so two workers handed the same message (Redis redelivery,
    a re-sent wake-up) cannot both train: the database, not the broker, says who runs the job.
    """
    now = utcnow()
    claimable = or_(
        Job.status == JobStatus.QUEUED.value,
        (Job.status == JobStatus.RUNNING.value) & (Job.lease_expires_at < now),
    )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.RUNNING.value,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt=Job.attempt + 1,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
            error=None,
        )
        .returning(Job.attempt)
    )
    attempt = result.scalar_one_or_none()
    if attempt is None:
        return None
    session.add(
        JobEvent(job_id=job_id, from_status=JobStatus.QUEUED.value, to_status="RUNNING",
                 attempt=attempt, reason=f"claimed by {owner}")
    )
    return Claim(job_id, attempt, owner)


def renew_lease(session: Session, claim: Claim, lease_seconds: int) -> tuple[bool, bool]:
    """Extend the lease. Returns (still_held, cancel_requested)."""
    now = utcnow()
    held = session.execute(
        update(Job)
        .where(
            Job.id == claim.job_id,
            Job.attempt == claim.attempt,
            Job.status == JobStatus.RUNNING.value,
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        .returning(Job.cancel_requested)
    ).scalar_one_or_none()
    if held is None:
        return False, False
    return True, bool(held)


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    attempt: int | None = None,
    reason: str | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """Move a job to `to` if the move is allowed and (when given) the attempt still owns it.

    Returns False when the job moved on without us (another attempt, a cancel): the caller's
    view is stale and it must not write more.
    """
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise JobNotFound(job_id)
    current = JobStatus(job.status)
    if attempt is not None and job.attempt != attempt:
        return False
    if to not in ALLOWED[current]:
        if current in TERMINAL_STATUSES or attempt is not None:
            return False
        raise IllegalTransition(f"{current} -> {to}")
    now = utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now}
    if to in TERMINAL_STATUSES:
        values.update(finished_at=now, lease_owner=None, lease_expires_at=None)
        if to is JobStatus.COMPLETED:
            values.update(progress=1.0, phase=None, error=None)
        else:
            values["error"] = reason
    if result is not None:
        values["result"] = result
    fenced = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == current.value, Job.attempt == job.attempt)
        .values(**values)
    )
    if fenced.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(
        JobEvent(job_id=job_id, from_status=current.value, to_status=to.value,
                 attempt=job.attempt, reason=reason)
    )
    return True


def request_cancel(session: Session, tenant_id: str, job_id: str) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next step."""
    job = get_job(session, tenant_id, job_id)
    status = JobStatus(job.status)
    if status in TERMINAL_STATUSES:
        raise JobConflict(f"job {job_id} is already {status.value}; only queued or running "
                          "jobs can be cancelled")
    session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    if status is JobStatus.QUEUED:
        transition(session, job_id, JobStatus.CANCELLED, reason="cancelled before it started")
    session.refresh(job)
    return job


def set_phase(session: Session, claim: Claim, phase: str | None = None,
              progress: float | None = None) -> bool:
    values: dict[str, Any] = {"updated_at": utcnow()}
    if phase is not None:
        values["phase"] = phase
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    done = session.execute(
        update(Job)
        .where(Job.id == claim.job_id, Job.attempt == claim.attempt,
               Job.status == JobStatus.RUNNING.value)
        .values(**values)
    )
    return done.rowcount == 1  # type: ignore[attr-defined]


def append_log(session: Session, job_id: str, attempt: int, line: str) -> None:
    session.add(JobLog(job_id=job_id, attempt=attempt, line=line[:MAX_LOG_LINE]))


def record_metric(session: Session, job_id: str, attempt: int, step: int,
                  values: dict[str, float]) -> None:
    session.add(JobMetric(job_id=job_id, attempt=attempt, step=step, values=values))


def tail_logs(session: Session, job_id: str, n_lines: int) -> list[JobLog]:
    rows = session.scalars(
        select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.id.desc()).limit(n_lines)
    ).all()
    return list(reversed(rows))


def list_metrics(session: Session, job_id: str) -> list[JobMetric]:
    return list(
        session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.id)
        ).all()
    )


def artifact_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"
