"""Deleting a job: its rows and every object it stored under its prefixes, or nothing.

What goes: the job row and, through the foreign keys' ON DELETE CASCADE, its events, logs,
metrics, exports, idempotency keys and terminated deployments; in storage, everything under
`storage_keys.job_prefixes` (adapter, tokenizer, exports, checkpoints of both layouts).

What refuses (409, `JobConflict`), and why:

- a RUNNING job. Its worker writes to storage outside any database transaction, so no row
  can fence an upload already on its way: deleting under it could leave objects that nothing
  owns. The caller cancels it first (its worker stops at the next step and records
  CANCELLED after its last write) and deletes it then. A QUEUED or PAUSED job has no worker
  writing: it is cancelled here, through `jobs.request_cancel`, and deleted.
- a RUNNING export whose lease holds, for the same reason; a queued one just goes.
- a LIVE deployment: clients call its endpoint, and a job delete must not end it as a side
  effect. The caller terminates it first (`POST /v1/deploy/terminate`).

Everything happens in the caller's transaction: the job row is locked first, so no claim,
export, deployment or cancel can slip in between the checks and the delete; objects are
removed before the commit, so a storage failure rolls the rows back and the job can be
deleted again (removing objects twice is harmless).
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from shared import jobs, storage_keys
from shared.models import (
    TERMINAL_STATUSES,
    Deployment,
    DeploymentStatus,
    ExportStatus,
    Job,
    JobExport,
    JobStatus,
    as_utc,
    utcnow,
)
from shared.storage import Storage
from shared.tenancy import Scope


def delete_job(session: Session, storage: Storage, scope: Scope, job_id: str) -> None:
    """Delete the job `scope` sees (`JobNotFound` otherwise, another tenant's included) with
    everything it stored; the caller commits. Raises `JobConflict` while it runs, while an
    export of it is being built, or while a deployment of it is live."""
    job = jobs.get_job(session, scope, job_id)
    _lock(session, job.id)
    session.refresh(job)
    status = JobStatus(job.status)
    if status is JobStatus.RUNNING:
        raise jobs.JobConflict(
            f"job {job.id} is RUNNING and its worker may still be writing files: cancel it "
            f"first (POST /v1/finetune/llm/{job.id}/cancel), then delete it once it is "
            "CANCELLED"
        )
    if status not in TERMINAL_STATUSES:
        job = jobs.request_cancel(session, scope, job.id)
    _refuse_busy_exports(session, job.id)
    _refuse_live_deployments(session, job.id)
    session.execute(delete(Job).where(Job.id == job.id),
                    execution_options={"synchronize_session": False})
    session.expunge(job)
    for prefix in storage_keys.job_prefixes(job.id):
        storage.delete_prefix(prefix)


def _lock(session: Session, job_id: str) -> None:
    """Hold the job row until the caller's transaction ends. On PostgreSQL, FOR UPDATE also
    makes an export or deployment being inserted for the job (whose foreign key check takes a
    key-share lock) wait, and then fail to find it. On SQLite, which ignores FOR UPDATE, the
    UPDATE takes the database's write lock: no other writer commits until this one does."""
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()),
                    execution_options={"synchronize_session": False})
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def _refuse_busy_exports(session: Session, job_id: str) -> None:
    # Locked: a worker's claim of a queued export waits, then finds it deleted.
    busy = [
        f"{export.id} ({export.kind})"
        for export in session.scalars(
            select(JobExport).where(JobExport.job_id == job_id).with_for_update()
        )
        if export.status == ExportStatus.RUNNING.value
        and export.lease_expires_at is not None
        and as_utc(export.lease_expires_at) > utcnow()
    ]
    if busy:
        raise jobs.JobConflict(
            f"job {job_id} has exports being built ({', '.join(busy)}) whose files are still "
            "being written: delete it once they have finished"
        )


def _refuse_live_deployments(session: Session, job_id: str) -> None:
    live = list(session.scalars(
        select(Deployment.id).where(Deployment.job_id == job_id,
                                    Deployment.status == DeploymentStatus.LIVE.value)
    ))
    if live:
        raise jobs.JobConflict(
            f"job {job_id} is served by live deployments {live}: terminate them first "
            "(POST /v1/deploy/terminate), then delete the job"
        )
