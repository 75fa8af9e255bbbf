"""Exports of completed jobs (merged model, GGUF): every write to an export row.

An export has its own row and its own states (QUEUED → RUNNING → COMPLETED | FAILED); nothing
here writes to the job, so an export that fails leaves its job as it was. As with jobs, the
database decides who runs an export: a worker claims it with one conditional UPDATE, so a
message delivered twice runs it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.jobs import JobConflict, JobNotFound, get_job
from shared.models import ExportStatus, Job, JobExport, JobStatus, utcnow
from shared.schema import ExportRequest
from shared.tenancy import ALL_TENANTS, Scope

MAX_EXPORT_ERROR = 8000


@dataclass(frozen=True)
class ExportClaim:
    export_id: str
    job_id: str
    tenant_id: str
    kind: str
    attempt: int
    owner: str


def request_export(
    session: Session, scope: Scope, job_id: str, spec: ExportRequest
) -> tuple[JobExport, bool]:
    """The job's export of `spec.kind`, and whether it must be queued now.

    The job must be one `scope` sees (`JobNotFound` otherwise) and COMPLETED (`JobConflict`
    naming its status). Asking again for an export that exists returns it as it is, unless it
    FAILED, or it is RUNNING on a lease that expired (its worker died): then it is queued
    again.
    """
    job = get_job(session, scope, job_id)
    # Key-share locked: a delete of the job (`shared.job_deletion`) under way finishes first,
    # and then the job is not found, rather than an export row inserted for a job gone.
    if session.scalar(select(Job.id).where(Job.id == job.id)
                      .with_for_update(read=True, key_share=True)) is None:
        raise JobNotFound(job.id)
    if job.status != JobStatus.COMPLETED:
        raise JobConflict(f"job {job.id} is {job.status}: only a COMPLETED job can be exported")
    existing = _find(session, job.id, spec.kind)
    if existing is None:
        try:
            with session.begin_nested():
                created = JobExport(job_id=job.id, kind=spec.kind)
                session.add(created)
            return created, True
        except IntegrityError:
            # The same export asked for at the same moment: the other request created it.
            existing = _find(session, job.id, spec.kind)
            assert existing is not None
            return existing, False
    return existing, _requeue(session, existing)


def request_on_completion(
    session: Session, job_id: str, specs: Sequence[ExportRequest]
) -> list[str]:
    """The exports a just COMPLETED job asked for at submit
    (`training_config.exports_on_completion`), created QUEUED; the ids to wake a worker for."""
    queued = []
    for spec in specs:
        export, queue_it = request_export(session, ALL_TENANTS, job_id, spec)
        if queue_it:
            queued.append(export.id)
    return queued


def _find(session: Session, job_id: str, kind: str) -> JobExport | None:
    return session.scalar(
        select(JobExport).where(JobExport.job_id == job_id, JobExport.kind == kind)
        .execution_options(populate_existing=True)
    )


def _requeue(session: Session, export: JobExport) -> bool:
    now = utcnow()
    requeued = session.execute(
        update(JobExport)
        .where(JobExport.id == export.id, or_(
            JobExport.status == ExportStatus.FAILED.value,
            (JobExport.status == ExportStatus.RUNNING.value)
            & (JobExport.lease_expires_at < now),
        ))
        .values(status=ExportStatus.QUEUED.value, error=None, lease_owner=None,
                lease_expires_at=None, finished_at=None, files=None, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    session.refresh(export)
    return bool(requeued.rowcount)  # type: ignore[attr-defined]


def list_exports(session: Session, scope: Scope, job_id: str) -> list[JobExport]:
    """The exports of a job `scope` sees (`JobNotFound` otherwise), oldest first."""
    job = get_job(session, scope, job_id)
    return list(session.scalars(
        select(JobExport).where(JobExport.job_id == job.id)
        .order_by(JobExport.created_at, JobExport.id)
    ))


def claim_export(
    session: Session, export_id: str, owner: str, lease_seconds: int
) -> ExportClaim | None:
    """Take a QUEUED export for one run, or None when it is not QUEUED (running elsewhere,
    done). One conditional UPDATE decides, so a message delivered twice runs it once. The
    lease covers the whole run (an export has no heartbeat): past it, asking for the export
    again queues it anew (`request_export`)."""
    now = utcnow()
    claimed = session.execute(
        update(JobExport)
        .where(JobExport.id == export_id, JobExport.status == ExportStatus.QUEUED.value)
        .values(status=ExportStatus.RUNNING.value, attempt=JobExport.attempt + 1,
                lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds),
                updated_at=now)
        .returning(JobExport.job_id, JobExport.kind, JobExport.attempt)
    ).one_or_none()
    if claimed is None:
        return None
    job_id, kind, attempt = claimed
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    assert tenant_id is not None
    return ExportClaim(export_id, job_id, tenant_id, kind, attempt, owner)


def finish_export(
    session: Session, claim: ExportClaim, *, files: list[str] | None = None,
    error: str | None = None,
) -> bool:
    """COMPLETED with its `files` (artifact names), or FAILED with `error`; False when the
    claim no longer holds the export (its lease expired and it was queued again)."""
    now = utcnow()
    status = ExportStatus.FAILED if error is not None else ExportStatus.COMPLETED
    finished = session.execute(
        update(JobExport)
        .where(JobExport.id == claim.export_id, JobExport.attempt == claim.attempt,
               JobExport.status == ExportStatus.RUNNING.value)
        .values(status=status.value, files=files,
                error=None if error is None else error[:MAX_EXPORT_ERROR],
                lease_owner=None, lease_expires_at=None, finished_at=now, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    return bool(finished.rowcount)  # type: ignore[attr-defined]
