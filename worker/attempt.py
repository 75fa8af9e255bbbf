"""One attempt at a claimed job: the pipeline run under a heartbeat (lease, cancel, pause,
time limits), its outputs published, and its outcome recorded as the job's transition."""

from __future__ import annotations

import gc
import logging
import shutil
import time
import traceback
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from shared import exports, jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.models import JobStatus
from shared.payload_secrets import redact_secrets, secret_values
from shared.queue import enqueue_export
from shared.schema import ExportRequest, FinetuneRequest
from shared.settings import Settings
from shared.storage import StorageError, StorageUnreachable
from shared.storage_retry import retrying_storage
from worker import memory_ladder
from worker.heartbeat import Heartbeat
from worker.job_reporter import DatabaseReporter
from worker.metrics import AttemptMetrics
from worker.outage import through_outage
from worker.pipeline.errors import StopReason, TrainingStopped

if TYPE_CHECKING:
    from worker.pipeline.base_cache import BaseModelCache
    from worker.pipeline.checkpoints import CheckpointStore

log = logging.getLogger("tunery.worker")

# How long the outcome of an attempt waits for an unreachable database. Past it the lease
# expires, the reaper re-queues the job, and the next attempt redoes the work since the last
# checkpoint: slower, but nothing is lost.
FINISH_PATIENCE_S = 300.0
# How long a stopping worker waits for an unreachable database to hand its job back: its
# supervisor kills it seconds after asking it to stop. Past it the lease's expiry re-queues
# the job instead.
HAND_BACK_PATIENCE_S = 10.0


def run_attempt(
    claim: Claim,
    request: FinetuneRequest,
    settings: Settings,
    *,
    base_models: BaseModelCache | None = None,
) -> bool:
    """Train, publish and record the outcome of `claim`'s attempt; never raises. Returns
    whether the job went back to the queue: this worker is stopping (`worker.shutdown`), or
    the job was resumed while it paused."""
    # First thing after the claim: the lease it set runs from now on.
    heartbeat = Heartbeat(
        claim,
        lease_seconds=settings.leases.lease_seconds,
        every_s=settings.leases.heartbeat_seconds,
        soft_limit_s=settings.leases.job_soft_time_limit_s,
        hard_limit_s=settings.leases.job_hard_time_limit_s,
    )
    heartbeat.start()
    attempt_metrics = AttemptMetrics()
    # Imported here so the Celery app (and the API, which shares shared.queue) loads fast; a
    # worker has them loaded already (`worker.tasks`, at worker_init).
    from worker.device_group import ProcessGroupFailed, train_on_devices
    from worker.pipeline.checkpoints import CheckpointStore
    from worker.pipeline.errors import PipelineError
    from worker.pipeline.job_dirs import job_working_directory, tenant_hub_cache
    from worker.pipeline.run import run_job
    from worker.publish import publish_outputs

    # Hub and W&B errors may quote the token they were given: every log line and failure
    # reason of this job is scrubbed of the job's secrets.
    secrets = secret_values(request.model_dump(mode="json"))
    reporter = DatabaseReporter(claim, heartbeat, secrets=secrets,
                                attempt_metrics=attempt_metrics)
    try:
        # Every read and write rides out a storage outage up to its deadline, saying so in
        # the job's log; past it the job goes back to the queue (below).
        storage = retrying_storage(settings, reporter.log)
        # An earlier attempt's checkpoints live here; this attempt resumes from the latest.
        checkpoints = CheckpointStore(
            storage,
            claim.job_id,
            every_steps=settings.training.checkpoint_every_steps,
            keep=settings.training.checkpoints_to_keep,
            attempt=claim.attempt,
        )
        assert settings.training.work_dir is not None
        work_dir = Path(settings.training.work_dir) / f"{claim.job_id}-{claim.attempt}"
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
    except Exception as exc:
        # The worker's fault (a full disk, a storage setting), not the job's: without this
        # the heartbeat would go on renewing the lease of a job nobody runs.
        heartbeat.end()
        attempt_metrics.end()
        give_up_the_attempt(claim, reporter, f"worker {claim.owner} could not prepare the "
                                             f"attempt: {type(exc).__name__}: {exc}")
        return False
    handed_back = False
    rung = 0
    try:
        reporter.log(f"attempt {claim.attempt} started on {claim.owner}")
        start = memory_ladder.starting_rung(claim, request, reporter.log)
        if start.rung is None:
            reporter.log(f"failed: {start.reason}")
            finish(claim, reporter, JobStatus.FAILED, reason=start.reason,
                   error_code=memory_ladder.ERROR_CODE)
            return False
        rung = start.rung
        memory_ladder.reset_peak_memory()
        hub_cache = tenant_hub_cache(settings.local_files_dir(), claim.tenant_id,
                                     request.hf_config.hf_token)
        if request.training_config.devices > 1:
            result = train_on_devices(request, work_dir, reporter, settings, claim=claim,
                                      memory_rung=rung, hub_cache_dir=hub_cache,
                                      lease_held=heartbeat.holds_lease)
        else:
            # Never the checkout or the data dir: loaders read relative names from here.
            with job_working_directory(work_dir / "cwd"):
                result = run_job(request, work_dir, reporter, settings, checkpoints,
                                 base_models=base_models, hub_cache_dir=hub_cache,
                                 memory_rung=memory_ladder.rung_of(request, rung))
        reporter.phase("uploading")
        uploaded = publish_outputs(
            claim.job_id, result.output_dir, request.hf_config, storage,
            should_stop=partial(stops_upload, reporter), log=reporter.log,
        )
        summary = {
            "steps": result.steps,
            "first_loss": result.first_loss,
            "last_loss": result.last_loss,
            "train_rows": result.train_rows,
            "eval_rows": result.eval_rows,
            "best_eval_loss": result.best_eval_loss,
            "best_step": result.best_step,
            "trained_tokens": result.trained_tokens,
            "artifacts": uploaded,
        }
        if finish(claim, reporter, JobStatus.COMPLETED, result=summary,
                  exports_asked=request.training_config.exports_on_completion):
            discard_checkpoints(checkpoints)
    except TrainingStopped as stop:
        if stop.reason == StopReason.CANCELLED:
            reporter.log("training stopped: cancelled by the user")
            finish(claim, reporter, JobStatus.CANCELLED, reason="cancelled by the user")
        elif stop.reason == StopReason.TIMEOUT:
            reason = timeout_reason(claim, checkpoints, settings.leases.job_soft_time_limit_s)
            reporter.log(f"failed: {reason}")
            finish(claim, reporter, JobStatus.FAILED, reason=reason)
        elif stop.reason in (StopReason.WORKER_STOPPING, StopReason.PAUSED,
                             StopReason.STORAGE_UNAVAILABLE):
            handed_back = hand_back(claim, reporter, stop)
        else:
            # A lost lease: another attempt owns the job and records its outcome.
            log.warning("job %s attempt %s stopped: %s", claim.job_id, claim.attempt, stop.reason)
    except StorageUnreachable as exc:
        # Past the retry deadline, reading the data or publishing: no fault of the job.
        reporter.log(f"storage unavailable past its retry deadline: {exc}")
        handed_back = hand_back(claim, reporter,
                                TrainingStopped(StopReason.STORAGE_UNAVAILABLE))
    except ProcessGroupFailed as exc:
        # A rank died (killed, or the host took a device away): the attempt is lost, and the
        # job is retried from its last checkpoint like one whose worker died; its wake-up
        # goes back to the broker, for this worker or another to take at once.
        handed_back = give_up_the_attempt(claim, reporter,
                                          redact_secrets(str(exc), secrets)[:2000])
    except PipelineError as exc:
        reason = redact_secrets(str(exc), secrets)
        reporter.log(f"failed: {reason}")
        finish(claim, reporter, JobStatus.FAILED, reason=reason)
    except Exception as exc:
        if memory_ladder.is_out_of_memory(exc):
            handed_back = step_down_the_memory_ladder(claim, request, reporter, rung, exc)
            return handed_back
        log.error("job %s attempt %s crashed\n%s", claim.job_id, claim.attempt,
                  redact_secrets(traceback.format_exc(), secrets))
        reason = redact_secrets(f"internal error: {type(exc).__name__}: {exc}", secrets)[:2000]
        reporter.log(f"failed: {reason}")
        finish(claim, reporter, JobStatus.FAILED, reason=reason)
    finally:
        heartbeat.end()
        # Reports held through a database outage (an attempt that lost its lease to one
        # stops without a finish() that would write them).
        flush_reports(reporter, patience_s=settings.leases.lease_seconds)
        shutil.rmtree(work_dir, ignore_errors=True)
        release_accelerator_memory()
        attempt_metrics.end()
    return handed_back


def finish(
    claim: Claim,
    reporter: DatabaseReporter,
    status: JobStatus,
    *,
    reason: str | None = None,
    result: dict | None = None,
    exports_asked: Sequence[ExportRequest] = (),
    error_code: str | None = None,
) -> bool:
    """Record the attempt's outcome, after the reports still waiting; False when a newer
    attempt or a cancel owns the job, or the database stayed unreachable.

    A COMPLETED job's `exports_asked` (`training_config.exports_on_completion`) are created
    QUEUED in the same transaction, so that no crash completes the job without them, then
    each gets its wake-up; the job waits for none of them, and failing to queue them never
    undoes its completion (asking again through `POST .../exports` makes up for it).
    """
    queued: list[str] = []

    def record() -> bool:
        reporter.flush()
        queued.clear()
        with session_scope() as session:
            done = jobs.transition(
                session, claim.job_id, status, attempt=claim.attempt, reason=reason,
                result=result, error_code=error_code,
            )
            if done and status is JobStatus.COMPLETED and exports_asked:
                queued.extend(create_exports(session, claim, exports_asked))
            return done

    what = f"job {claim.job_id} attempt {claim.attempt}: recording {status}"
    done = through_outage(record, FINISH_PATIENCE_S, what)
    reporter.heartbeat.end()  # the attempt is over: its lease need not be renewed
    if done is None:
        return False
    if done and reporter.attempt_metrics is not None:
        reporter.attempt_metrics.ended_as(status)
    if not done:
        log.warning(
            "job %s attempt %s: could not record %s; a newer attempt or a cancel owns the job",
            claim.job_id, claim.attempt, status,
        )
    for export_id in queued:
        enqueue_export(export_id)
    return done


def create_exports(
    session: Session, claim: Claim, exports_asked: Sequence[ExportRequest]
) -> list[str]:
    """The exports a job asked for at submit, created in its completing transaction under a
    savepoint: if they cannot be, the job completes without them (and says so in its log)."""
    try:
        with session.begin_nested():
            queued = exports.request_on_completion(session, claim.job_id, exports_asked)
            kinds = ", ".join(spec.kind for spec in exports_asked)
            jobs.append_log(session, claim.job_id, claim.attempt, f"exports queued: {kinds}")
            return queued
    except (SQLAlchemyError, jobs.JobConflict) as exc:
        log.exception("job %s: could not queue its exports", claim.job_id)
        jobs.append_log(session, claim.job_id, claim.attempt,
                        f"exports not queued ({type(exc).__name__}); ask for them again")
        return []


def stops_upload(reporter: DatabaseReporter) -> StopReason | None:
    """What stops the upload of a trained job: anything but a pause, which waits for nothing
    once training is over (the job completes)."""
    reason = reporter.should_stop()
    return None if reason == StopReason.PAUSED else reason


def hand_back(claim: Claim, reporter: DatabaseReporter, stop: TrainingStopped) -> bool:
    """The worker is stopping, the user paused the job, or storage stayed unavailable past
    its retry deadline: put the job back in the queue for the next worker, or PAUSED until
    resumed (a pause asked meanwhile, or not withdrawn), or end it CANCELLED if the user
    asked meanwhile; the next attempt resumes from its last checkpoint in storage (a stop
    saves one at the step it stopped at; storage being away, its last one stored). Returns
    whether the job is QUEUED again."""
    paused = stop.reason == StopReason.PAUSED
    storage_down = stop.reason == StopReason.STORAGE_UNAVAILABLE
    requeued = ("paused, then resumed before the pause was done: handed back" if paused
                else "storage unavailable: handed back" if storage_down
                else f"worker {claim.owner} stopping: handed back")

    def record() -> JobStatus | None:
        reporter.flush()
        with session_scope() as session:
            return jobs.hand_back(session, claim, reason=requeued)

    what = f"job {claim.job_id} attempt {claim.attempt}: handing it back"
    # A stopping worker has seconds before its supervisor kills it; the others have no hurry.
    hurried = stop.reason == StopReason.WORKER_STOPPING
    patience = HAND_BACK_PATIENCE_S if hurried else FINISH_PATIENCE_S
    status = through_outage(record, patience, what)
    reporter.heartbeat.end()
    if status is not None and reporter.attempt_metrics is not None:
        reporter.attempt_metrics.ended_as(status)
    where = f" at step {stop.step}" if stop.step is not None else ""
    if status is JobStatus.PAUSED:
        reporter.log(f"paused{where or ' before training'}; a resume continues from the last "
                     f"checkpoint")
    elif status is JobStatus.QUEUED and paused:
        reporter.log(f"resumed while pausing{where}: job handed back to the queue; the next "
                     f"attempt resumes from its last checkpoint")
    elif status is JobStatus.QUEUED and storage_down:
        reporter.log(f"storage unavailable: job handed back{where}; the next attempt resumes "
                     f"from its last checkpoint in storage")
    elif status is JobStatus.QUEUED:
        reporter.log(f"worker stopping: job handed back{where}; the next attempt resumes from "
                     f"its last checkpoint")
    elif status is JobStatus.CANCELLED:
        reporter.log("training stopped: cancelled by the user")
    else:
        log.warning("job %s attempt %s: %s; could not hand the job back (the database is "
                    "unreachable or it moved on); its lease expires instead",
                    claim.job_id, claim.attempt, stop.reason.value)
    return status is JobStatus.QUEUED


def give_up_the_attempt(claim: Claim, reporter: DatabaseReporter, why: str) -> bool:
    """End an attempt that could not go on for a fault of its worker (it could not start,
    or a rank of its process group died): the job moves on at once as from a lost attempt
    (counted: a worker that keeps failing fails the job after its attempts, with `why` in the
    reason), never stays RUNNING under a live heartbeat. Returns whether the job is QUEUED
    again."""
    log.error("job %s attempt %s: %s", claim.job_id, claim.attempt, why)
    reporter.log(f"attempt {claim.attempt}: {why}")

    def record() -> list[tuple[str, JobStatus]]:
        reporter.flush()
        with session_scope() as session:
            return jobs.requeue_lost_attempt(session, claim, why)

    moved = through_outage(record, FINISH_PATIENCE_S,
                           f"job {claim.job_id} attempt {claim.attempt}: giving the attempt up")
    return (claim.job_id, JobStatus.QUEUED) in (moved or [])


def step_down_the_memory_ladder(claim: Claim, request: FinetuneRequest,
                                reporter: DatabaseReporter, rung: int,
                                exc: BaseException) -> bool:
    """The attempt ran out of memory on `rung`: hand the job back on the next rung of the
    memory ladder, to resume from its last checkpoint, or fail it when none is left. Returns
    whether the job is QUEUED again."""
    memory = memory_ladder.out_of_memory_figures(exc)
    step = memory_ladder.next_step(request, rung, memory)
    if step.rung is None:
        reporter.log(f"failed: {step.reason}")
    else:
        reporter.log(f"memory ladder: {step.reason}; handing the job back to resume from its "
                     f"last checkpoint")

    def record() -> JobStatus | None:
        reporter.flush()
        return memory_ladder.record_step(claim, step)

    what = f"job {claim.job_id} attempt {claim.attempt}: recording an out-of-memory"
    status = through_outage(record, FINISH_PATIENCE_S, what)
    reporter.heartbeat.end()
    if status is not None and reporter.attempt_metrics is not None:
        reporter.attempt_metrics.ended_as(status)
    if status is JobStatus.PAUSED:
        reporter.log("paused after running out of memory; a resume continues on the next "
                     "rung from the last checkpoint")
    elif status is JobStatus.CANCELLED:
        reporter.log("training stopped: cancelled by the user")
    elif status is None:
        log.warning("job %s attempt %s: out of memory, and the job moved on meanwhile",
                    claim.job_id, claim.attempt)
    return status is JobStatus.QUEUED


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


def flush_reports(reporter: DatabaseReporter, patience_s: float) -> None:
    deadline = time.monotonic() + patience_s
    while not reporter.flush():
        if time.monotonic() > deadline:
            log.error("job %s: log lines and metrics lost: database unreachable for %.0f s",
                      reporter.claim.job_id, patience_s)
            return
        time.sleep(0.5)


def discard_checkpoints(checkpoints: CheckpointStore) -> None:
    """Keep only the adapters of a completed job's checkpoints (`keep_adapters_only`): what
    made them resumable is of no use any more, and takes several times their size."""
    try:
        checkpoints.keep_adapters_only()
    except StorageError as exc:
        log.warning("job %s: could not delete its checkpoints: %s", checkpoints.job_id, exc)


def release_accelerator_memory() -> None:
    """Give the GPU memory of a finished, failed or cancelled job back before the next one."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
