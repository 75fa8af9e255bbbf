"""Celery entry point: `celery -A worker.tasks worker` (or `tunery worker`)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from celery.signals import worker_init

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.models import JobStatus
from shared.queue import TRAIN_TASK, declare_queue, get_celery
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from shared.storage import StorageError, storage_from_settings
from worker.job_reporter import DatabaseReporter

if TYPE_CHECKING:
    from worker.pipeline.checkpoints import CheckpointStore

log = logging.getLogger("tunery.worker")

app = get_celery()


@worker_init.connect
def _declare_queue_before_consuming(**_: object) -> None:
    declare_queue()


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> None:
    settings = get_settings()
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, worker_identity(), settings.lease_seconds)
        if claim is None:
            log.info("job %s: nothing to claim (done, cancelled or held elsewhere)", job_id)
            return
        payload = session.get_one(jobs.Job, job_id).payload
    run_claimed_job(claim, FinetuneRequest.model_validate(payload))


def run_claimed_job(claim: Claim, request: FinetuneRequest) -> None:
    # Imported here so the Celery app (and the API, which shares shared.queue) loads fast.
    from worker.pipeline.checkpoints import CheckpointStore
    from worker.pipeline.errors import PipelineError, TrainingStopped
    from worker.pipeline.run import run_job

    settings = get_settings()
    reporter = DatabaseReporter(claim, settings.lease_seconds)
    # An earlier attempt's checkpoints live here; this attempt resumes from the latest.
    checkpoints = CheckpointStore(
        storage_from_settings(settings),
        claim.job_id,
        every_steps=settings.checkpoint_every_steps,
        keep=settings.checkpoints_to_keep,
    )
    assert settings.work_dir is not None
    work_dir = Path(settings.work_dir) / f"{claim.job_id}-{claim.attempt}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        reporter.log(f"attempt {claim.attempt} started on {claim.owner}")
        result = run_job(request, work_dir, reporter, settings, checkpoints)
        reporter.phase("uploading")
        uploaded = upload_outputs(claim.job_id, result.output_dir)
        reporter.log(f"uploaded {len(uploaded)} files to {jobs.artifact_prefix(claim.job_id)}")
        summary = {
            "steps": result.steps,
            "first_loss": result.first_loss,
            "last_loss": result.last_loss,
            "train_rows": result.train_rows,
            "eval_rows": result.eval_rows,
            "best_eval_loss": result.best_eval_loss,
            "best_step": result.best_step,
            "artifacts": uploaded,
        }
        if finish(claim, JobStatus.COMPLETED, result=summary):
            discard_checkpoints(checkpoints)
    except TrainingStopped as stop:
        if stop.reason == "cancelled":
            reporter.log("training stopped: cancelled by the user")
            finish(claim, JobStatus.CANCELLED, reason="cancelled by the user")
        else:
            log.warning("job %s attempt %s stopped: %s", claim.job_id, claim.attempt, stop.reason)
    except PipelineError as exc:
        reporter.log(f"failed: {exc}")
        finish(claim, JobStatus.FAILED, reason=str(exc))
    except Exception as exc:
        log.exception("job %s attempt %s crashed", claim.job_id, claim.attempt)
        reason = f"internal error: {type(exc).__name__}: {exc}"[:2000]
        reporter.log(f"failed: {reason}")
        finish(claim, JobStatus.FAILED, reason=reason)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def upload_outputs(job_id: str, output_dir: Path) -> list[str]:
    storage = storage_from_settings(get_settings())
    prefix = jobs.artifact_prefix(job_id)
    names = []
    for path in sorted(p for p in output_dir.rglob("*") if p.is_file()):
        name = path.relative_to(output_dir).as_posix()
        storage.put_file(prefix + name, path)
        names.append(name)
    return names


def discard_checkpoints(checkpoints: CheckpointStore) -> None:
    """Delete a completed job's checkpoints: its final adapter supersedes them, and they would
    otherwise be listed among its artifacts."""
    try:
        checkpoints.delete_all()
    except StorageError as exc:
        log.warning("job %s: could not delete its checkpoints: %s", checkpoints.job_id, exc)


def finish(
    claim: Claim, status: JobStatus, *, reason: str | None = None, result: dict | None = None
) -> bool:
    """Record the attempt's outcome; False when a newer attempt or a cancel owns the job."""
    with session_scope() as session:
        if not jobs.transition(
            session, claim.job_id, status, attempt=claim.attempt, reason=reason, result=result
        ):
            log.warning(
                "job %s attempt %s: could not record %s; a newer attempt or a cancel owns the job",
                claim.job_id,
                claim.attempt,
                status,
            )
            return False
    return True
