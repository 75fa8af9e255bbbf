"""Celery entry point: `celery -A worker.tasks worker` (or `tunery worker`).

A worker serves one device class (`TUNERY_WORKER_DEVICE_CLASS`): it consumes that class's
queue and claims that class's jobs only. A task claims a job and hands it to
`worker.attempt`, which runs it. When the worker shuts
down, the running attempt hands its job back (`worker.shutdown`) and the task rejects its
message back to the broker, so that another worker wakes up for the job at once."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject
from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down
from pydantic import ValidationError

from shared import exports, jobs
from shared.db import session_scope
from shared.device_classes import worker_class_problem
from shared.jobs import Claim
from shared.maintenance import MaintenanceLoop
from shared.models import JobStatus
from shared.payload_secrets import SecretsUnreadable, open_secrets
from shared.private_files import make_private_dir, restrict_umask
from shared.queue import EXPORT_TASK, TRAIN_TASK, declare_queue, get_celery
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from shared.webhooks.sender import WebhookSender, start_senders
from worker.attempt import run_attempt
from worker.gone_workers import release_gone_workers
from worker.metrics_server import serve_worker_metrics
from worker.outage import through_outage
from worker.shutdown import begin_shutdown, shutting_down
from worker.stale_attempts import remove_stale_attempt_dirs

if TYPE_CHECKING:
    from worker.pipeline.base_cache import BaseModelCache

log = logging.getLogger("tunery.worker")

# At import, which is the worker process's start (`celery -A worker.tasks worker`): the job
# files, the work dir and the SQLite files it writes are for the Tunery user alone.
restrict_umask()

app = get_celery()
# The solo pool, one job at a time, whose cold shutdown hands the job back (`solo_pool`).
# Here, not in the shared Celery config, which the API loads too; `worker_command` names no
# pool, so that this one is used.
app.conf.worker_pool = "worker.solo_pool:HandBackSoloPool"


_maintenance: MaintenanceLoop | None = None
_webhook_senders: list[WebhookSender] = []
# The base model kept between the jobs of this process (one job at a time: solo pool).
_base_models: BaseModelCache | None = None

# How long a wake-up waits for an unreachable database before giving up on its claim; the
# job stays QUEUED and the maintenance sweep wakes it again once the database is back.
CLAIM_PATIENCE_S = 60.0


@worker_init.connect
def _prepare_before_consuming(**_: object) -> None:
    try:
        settings = get_settings()
        problem = worker_class_problem(settings.broker.worker_class(),
                                       settings.training.worker_devices)
        if problem:
            raise RuntimeError(problem)
        log.info("worker of device class %s", settings.broker.worker_class().describe())
        declare_queue()
        serve_worker_metrics(settings)
        work_dir = get_settings().training.work_dir
        assert work_dir is not None
        make_private_dir(work_dir)
    except Exception as exc:
        # Celery logs what a signal handler raises and starts consuming all the same: a
        # worker that cannot prepare would claim jobs it cannot run. SystemExit gets past
        # that, so the process ends and its supervisor (tunery up, Docker, systemd) says so.
        log.critical("worker cannot start: %s: %s", type(exc).__name__, exc)
        raise SystemExit(1) from exc
    remove_stale_attempt_dirs(Path(work_dir))
    # torch and transformers take seconds to import: paid once at start,
    # not after a claim, where it would delay the first heartbeat and every recovery.
    import worker.pipeline.run  # noqa: F401

    # The imports leave ~570k objects (modules, classes, functions) that live as long as the
    # process. Every full collection scans them, and one runs on the way to
    # each job's first step (accelerate's free_memory in Trainer.train) and one when a base
    # model is dropped. Frozen, collections only scan what jobs create.
    gc.collect()
    gc.freeze()


@worker_ready.connect
def _start_maintenance_and_webhooks(**_: object) -> None:
    # Sent before the consumer's loop runs a task: this process has claimed nothing yet, so
    # every lease under its host is another (or an earlier) process's.
    if get_settings().leases.release_dead_local_workers:
        try:
            release_gone_workers(os.getpid(), worker_marker=__name__)
        except Exception as exc:  # noqa: BLE001 - the leases expire all the same
            log.warning("could not look for dead workers on this host: %s: %s",
                        type(exc).__name__, exc)
    # The first sweep runs at once: a worker started after a crash re-queues the dead
    # worker's job as soon as its lease has expired.
    global _maintenance
    _maintenance = MaintenanceLoop(get_settings())
    _maintenance.start()
    # Webhooks go out wherever a worker runs, the embedded default included.
    _webhook_senders.extend(start_senders(get_settings(), worker_identity()))


@worker_shutting_down.connect
def _hand_back_the_running_job(**_: object) -> None:
    # Sent from inside Celery's signal handler, in the middle of the training job: only a
    # flag is set here (see worker.shutdown).
    begin_shutdown()


@worker_shutdown.connect
def _stop_maintenance_and_webhooks(**_: object) -> None:
    if _maintenance is not None:
        _maintenance.stop()
    for sender in _webhook_senders:
        sender.stop()


def base_model_cache() -> BaseModelCache:
    """This process's base model cache, on or off as `TUNERY_BASE_MODEL_CACHE` says."""
    global _base_models
    if _base_models is None:
        from worker.pipeline.base_cache import BaseModelCache

        _base_models = BaseModelCache(enabled=get_settings().training.base_model_cache)
    return _base_models


def worker_identity() -> str:
    """This process's name as a lease owner. The solo pool trains in this very process, so
    `tunery up`, which started it, can name its leases by its pid once it is gone."""
    return jobs.worker_identity(os.getpid())


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> None:
    """A wake-up: claim the fairest queued job of this worker's device class
    (`jobs.claim_next`). The job it names is the one whose submit sent it, and it is only
    named in the logs: taking it first would let the tenant that sent the most messages take
    the most workers."""
    if shutting_down():
        # A message delivered as the worker stops: back to the broker, for the next worker.
        raise Reject("worker stopping", requeue=True)
    claimed = claim_with_patience(job_id)
    if claimed is None:
        log.info("wake-up for job %s: nothing to claim (no job queued, or other workers "
                 "took them)", job_id)
        return
    claim, payload = claimed
    if claim.job_id != job_id:
        log.info("wake-up for job %s claimed job %s, the fairest queued", job_id, claim.job_id)
    request = open_request(claim, payload)
    if request is not None and run_claimed_job(claim, request):
        # The job is QUEUED again (this worker is stopping, or the job was resumed while it
        # paused): its wake-up goes back to the broker for another worker (acks_late keeps it
        # unacknowledged until now).
        raise Reject(f"job {claim.job_id} handed back to the queue", requeue=True)


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
            claim = jobs.claim_next(session, owner, settings.leases.lease_seconds,
                                    device_class=settings.broker.worker_class().name)
            if claim is None:
                return None
            return claim, session.get_one(jobs.Job, claim.job_id).payload

    return through_outage(claim_one, CLAIM_PATIENCE_S, f"the wake-up for job {job_id}")


def run_claimed_job(claim: Claim, request: FinetuneRequest) -> bool:
    """Run the claimed attempt with this process's settings and base model cache; whether it
    handed the job back (`run_attempt`)."""
    return run_attempt(claim, request, get_settings(), base_models=base_model_cache())


@app.task(name=EXPORT_TASK)
def export(export_id: str) -> None:
    """Run the export it names, if this worker can claim it: a message delivered twice, or
    for an export already running or done, claims nothing. The job is never written."""
    if shutting_down():
        raise Reject("worker stopping", requeue=True)
    settings, owner = get_settings(), worker_identity()

    def claim_one() -> exports.ExportClaim | None:
        with session_scope() as session:
            # No heartbeat renews it: the lease is the longest a job may run.
            return exports.claim_export(session, export_id, owner,
                                        settings.leases.job_hard_time_limit_s)

    claim = through_outage(claim_one, CLAIM_PATIENCE_S, f"the export {export_id}")
    if claim is None:
        log.info("export %s: nothing to claim (done, or running elsewhere)", export_id)
        return
    from worker.export_run import run_export

    run_export(claim, settings)
