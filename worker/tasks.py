"""Celery entry point: `celery -A worker.tasks worker` (or `tunery worker`)."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from celery.signals import worker_init, worker_ready, worker_shutdown
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.maintenance import MaintenanceLoop
from shared.models import JobStatus
from shared.payload_secrets import (
    SecretsUnreadable,
    open_secrets,
    redact_secrets,
    secret_values,
)
from shared.private_files import make_private_dir, restrict_umask
from shared.queue import TRAIN_TASK, declare_queue, get_celery
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from shared.storage import StorageError, storage_from_settings
from worker.heartbeat import Heartbeat
from worker.job_reporter import DatabaseReporter

if TYPE_CHECKING:
    from worker.pipeline.base_cache import BaseModelCache
    from worker.pipeline.checkpoints import CheckpointStore

log = logging.getLogger("tunery.worker")

# At import, which is the worker process's start (`celery -A worker.tasks worker`): the job
# files, the work dir and the SQLite files it writes are for the Tunery user alone.
restrict_umask()

T = TypeVar("T")

app = get_celery()


_maintenance: MaintenanceLoop | None = None
# The base model kept between the jobs of this process (one job at a time: solo pool).
_base_models: BaseModelCache | None = None

# How long a wake-up waits for an unreachable database before giving up on its claim; the
# job stays QUEUED and the maintenance sweep wakes it again once the database is back.
CLAIM_PATIENCE_S = 60.0


@worker_init.connect
def _prepare_before_consuming(**_: object) -> None:
    declare_queue()
    work_dir = get_settings().work_dir
    assert work_dir is not None
    make_private_dir(work_dir)
    # torch and transformers take seconds to import (7.8 s measured here): paid once at start,
    # not after a claim, where it would delay the first heartbeat and every recovery.
    import worker.pipeline.run  # noqa: F401

    # The imports leave ~570k objects (modules, classes, functions) that live as long as the
    # process. Every full collection scans them: 0.3-0.8 s here, and one runs on the way to
    # each job's first step (accelerate's free_memory in Trainer.train) and one when a base
    # model is dropped. Frozen, collections only scan what jobs create.
    gc.collect()
    gc.freeze()


@worker_ready.connect
def _start_maintenance(**_: object) -> None:
    # The first sweep runs at once: a worker started after a crash re-queues the dead
    # worker's job as soon as its lease has expired.
    global _maintenance
    _maintenance = MaintenanceLoop(get_settings())
    _maintenance.start()


@worker_shutdown.connect
def _stop_maintenance(**_: object) -> None:
    if _maintenance is not None:
        _maintenance.stop()


def base_model_cache() -> BaseModelCache:
    """This process's base model cache, on or off as `TUNERY_BASE_MODEL_CACHE` says."""
    global _base_models
    if _base_models is None:
        from worker.pipeline.base_cache import BaseModelCache

        _base_models = BaseModelCache(enabled=get_settings().base_model_cache)
    return _base_models


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> None:
    """A wake-up: claim the job it names or, if that one is taken, the oldest queued job."""
    claimed = claim_with_patience(job_id)
    if claimed is None:
        log.info("wake-up for job %s: nothing to claim (done, cancelled or held elsewhere)",
                 job_id)
        return
    claim, payload = claimed
    request = open_request(claim, payload)
    if request is not None:
        run_claimed_job(claim, request)


def open_request(claim: Claim, payload: dict[str, Any]) -> FinetuneRequest | None:
    """The request to train with: the stored payload with its secrets decrypted, only now and
    only in memory. A payload this worker cannot decrypt (another TUNERY_SECRET_KEY) fails the
    job with a reason that says so; returns None then."""
    try:
        return FinetuneRequest.model_validate(open_secrets(payload))
    except SecretsUnreadable as exc:
        reason = str(exc)
    except ValidationError as exc:
        # pydantic's message quotes input values, the decrypted secrets among them.
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors())
        reason = f"the stored payload no longer validates ({fields}); submit the job again"
    log.error("job %s attempt %s: %s", claim.job_id, claim.attempt, reason)
    with session_scope() as session:
        jobs.append_log(session, claim.job_id, claim.attempt, f"failed: {reason}")
        jobs.transition(session, claim.job_id, JobStatus.FAILED, attempt=claim.attempt,
                        reason=reason)
    return None


def claim_with_patience(job_id: str) -> tuple[Claim, dict[str, Any]] | None:
    settings, owner = get_settings(), worker_identity()

    def claim_one() -> tuple[Claim, dict[str, Any]] | None:
        with session_scope() as session:
            claim = jobs.claim_job(session, job_id, owner, settings.lease_seconds)
            if claim is None:
                claim = jobs.claim_next(session, owner, settings.lease_seconds)
            if claim is None:
                return None
            return claim, session.get_one(jobs.Job, claim.job_id).payload

    return through_outage(claim_one, CLAIM_PATIENCE_S, f"the wake-up for job {job_id}")


def through_outage(action: Callable[[], T], patience_s: float, what: str) -> T | None:
    """`action()`, retried every 2 s while the database is unreachable, for up to
    `patience_s`; None if it stays unreachable that long."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return action()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() > deadline:
                log.error("%s: given up, database unreachable for %.0f s: %s", what,
                          patience_s, exc)
                return None
            log.warning("%s waits: database unreachable: %s", what, exc)
            time.sleep(2.0)


def run_claimed_job(claim: Claim, request: FinetuneRequest) -> None:
    settings = get_settings()
    # First thing after the claim: the lease it set runs from now on.
    heartbeat = Heartbeat(
        claim,
        lease_seconds=settings.lease_seconds,
        every_s=settings.heartbeat_seconds,
        soft_limit_s=settings.job_soft_time_limit_s,
        hard_limit_s=settings.job_hard_time_limit_s,
    )
    heartbeat.start()
    # Imported here so the Celery app (and the API, which shares shared.queue) loads fast; a
    # worker has them loaded already (see _prepare_before_consuming).
    from worker.pipeline.checkpoints import CheckpointStore
    from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped
    from worker.pipeline.job_dirs import job_working_directory, tenant_hub_cache
    from worker.pipeline.run import run_job

    # Hub and W&B errors may quote the token they were given: every log line and failure
    # reason of this job is scrubbed of the job's secrets.
    secrets = secret_values(request.model_dump(mode="json"))
    reporter = DatabaseReporter(claim, heartbeat, secrets=secrets)
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
        hub_cache = tenant_hub_cache(settings.data_dir, claim.tenant_id,
                                     request.hf_config.hf_token)
        # Never the checkout or the data dir: loaders read relative names from here.
        with job_working_directory(work_dir / "cwd"):
            result = run_job(request, work_dir, reporter, settings, checkpoints,
                             base_models=base_model_cache(), hub_cache_dir=hub_cache)
        reporter.phase("uploading")
        uploaded = upload_outputs(claim.job_id, result.output_dir, heartbeat)
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
        if finish(claim, reporter, JobStatus.COMPLETED, result=summary):
            discard_checkpoints(checkpoints)
    except TrainingStopped as stop:
        if stop.reason == StopReason.CANCELLED:
            reporter.log("training stopped: cancelled by the user")
            finish(claim, reporter, JobStatus.CANCELLED, reason="cancelled by the user")
        elif stop.reason == StopReason.TIMEOUT:
            reason = timeout_reason(claim, checkpoints, settings.job_soft_time_limit_s)
            reporter.log(f"failed: {reason}")
            finish(claim, reporter, JobStatus.FAILED, reason=reason)
        else:
            log.warning("job %s attempt %s stopped: %s", claim.job_id, claim.attempt, stop.reason)
    except PipelineError as exc:
        reason = redact_secrets(str(exc), secrets)
        reporter.log(f"failed: {reason}")
        finish(claim, reporter, JobStatus.FAILED, reason=reason)
    except Exception as exc:
        log.error("job %s attempt %s crashed\n%s", claim.job_id, claim.attempt,
                  redact_secrets(traceback.format_exc(), secrets))
        reason = redact_secrets(f"internal error: {type(exc).__name__}: {exc}", secrets)[:2000]
        reporter.log(f"failed: {reason}")
        finish(claim, reporter, JobStatus.FAILED, reason=reason)
    finally:
        heartbeat.end()
        # Reports held through a database outage (an attempt that lost its lease to one
        # stops without a finish() that would write them).
        flush_reports(reporter, patience_s=settings.lease_seconds)
        shutil.rmtree(work_dir, ignore_errors=True)
        release_accelerator_memory()


def flush_reports(reporter: DatabaseReporter, patience_s: float) -> None:
    deadline = time.monotonic() + patience_s
    while not reporter.flush():
        if time.monotonic() > deadline:
            log.error("job %s: log lines and metrics lost: database unreachable for %.0f s",
                      reporter.claim.job_id, patience_s)
            return
        time.sleep(0.5)


def timeout_reason(claim: Claim, checkpoints: CheckpointStore, limit_s: int) -> str:
    reason = f"timeout: the attempt ran past the time limit of {limit_s} s"
    try:
        latest = checkpoints.latest()
    except StorageError:
        latest = None
    if latest is None:
        return reason
    return (f"{reason}; its checkpoint of step {latest.step} is kept: submit a new job with "
            f"resume_checkpoint_path \"{claim.job_id}\" to continue from it")


def release_accelerator_memory() -> None:
    """Give the GPU memory of a finished, failed or cancelled job back before the next one."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def upload_outputs(job_id: str, output_dir: Path, heartbeat: Heartbeat | None = None) -> list[str]:
    """Upload the adapter under the job's prefix; stops between files if the attempt lost its
    lease, so a stale attempt stops writing where a newer one writes the job's one adapter."""
    from worker.pipeline.errors import TrainingStopped

    storage = storage_from_settings(get_settings())
    prefix = jobs.artifact_prefix(job_id)
    names = []
    for path in sorted(p for p in output_dir.rglob("*") if p.is_file()):
        if heartbeat is not None and heartbeat.stop_reason is not None:
            raise TrainingStopped(heartbeat.stop_reason)
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


# How long the outcome of an attempt waits for an unreachable database. Past it the lease
# expires, the reaper re-queues the job, and the next attempt redoes the work since the last
# checkpoint: slower, but nothing is lost.
FINISH_PATIENCE_S = 300.0


def finish(
    claim: Claim,
    reporter: DatabaseReporter,
    status: JobStatus,
    *,
    reason: str | None = None,
    result: dict | None = None,
) -> bool:
    """Record the attempt's outcome, after the reports still waiting; False when a newer
    attempt or a cancel owns the job, or the database stayed unreachable."""

    def record() -> bool:
        reporter.flush()
        with session_scope() as session:
            return jobs.transition(
                session, claim.job_id, status, attempt=claim.attempt, reason=reason,
                result=result,
            )

    what = f"job {claim.job_id} attempt {claim.attempt}: recording {status}"
    done = through_outage(record, FINISH_PATIENCE_S, what)
    reporter.heartbeat.end()  # the attempt is over: its lease need not be renewed
    if done is None:
        return False
    if not done:
        log.warning(
            "job %s attempt %s: could not record %s; a newer attempt or a cancel owns the job",
            claim.job_id, claim.attempt, status,
        )
    return done
