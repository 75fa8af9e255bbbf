"""The periodic sweep that makes the database, not the broker, decide what runs.

Every worker runs it in a thread (and once when it starts), so it runs wherever training can
run, the embedded default included:

- jobs whose lease expired (worker killed, host lost) go back to QUEUED, or end FAILED once
  their attempts are used up (CANCELLED or PAUSED when the user asked for that);
- jobs running past the hard time limit end FAILED;
- QUEUED jobs get wake-ups when their device class's queue holds fewer waiting messages than
  the class has queued jobs (a Redis restart lost them, or the send after the submit failed),
  for every configured class, not only the sweeping worker's: a class scaled to no workers
  still gets the wake-ups that scale it up;
- QUEUED jobs routed to a class that is no longer configured (an operator removed it from
  TUNERY_DEVICE_CLASSES) get a warning and a log line saying that no worker takes them, and a
  warning in the worker's log: they wait, neither failed nor re-routed, until the class comes
  back (their wake-ups are then sent) or they are cancelled;
- idempotency keys past their TTL are forgotten, and so are finished webhook deliveries
  past their history;
- finished jobs' checkpoints and artifacts past their retention are removed
  (`shared.retention`), when the operator set one;
- now and then, dataset files that no dataset row owns are removed
  (`shared.orphaned_objects`).

A supervisor that sees its worker process exit (`tunery up`) need not wait for the lease:
`release_dead_worker` moves that worker's jobs at once, as the sweep would once the lease
expired.

Sweeps in several workers at once are safe: every move is a fenced UPDATE that only one wins,
and a surplus wake-up claims nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from shared import idempotency, jobs
from shared.db import session_scope
from shared.models import JobStatus
from shared.orphaned_objects import OrphanedDatasetObjects
from shared.queue import configured_queues, count_waiting_messages, enqueue_training
from shared.retention import RetentionResult, apply_retention
from shared.settings import Settings, get_settings
from shared.storage import storage_from_settings
from shared.webhooks import deliveries

log = logging.getLogger("tunery.maintenance")

# Jobs of classes no longer configured that one sweep warns; the next sweep takes the next.
UNSERVED_BATCH = 100

ORPHAN_SWEEP_EVERY_S = 600.0
"""How often the loop looks for dataset files without a dataset, and how long such a file
must stay so before it is removed."""


@dataclass
class SweepResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    woken: list[str] = field(default_factory=list)
    unserved: list[str] = field(default_factory=list)
    expired_keys: int = 0
    pruned_deliveries: int = 0
    retention: RetentionResult = field(default_factory=RetentionResult)


def reap(settings: Settings) -> SweepResult:
    """Re-queue or fail jobs whose worker is gone or past the hard time limit."""
    result = SweepResult()
    with session_scope() as session:
        result.timed_out = jobs.fail_past_hard_limit(session, settings.leases.job_hard_time_limit_s)
        for job_id, status in jobs.requeue_expired_leases(session):
            {
                JobStatus.QUEUED: result.requeued,
                JobStatus.FAILED: result.failed,
                JobStatus.CANCELLED: result.cancelled,
                JobStatus.PAUSED: result.paused,
            }[status].append(job_id)
        result.expired_keys = idempotency.delete_expired(session, settings.limits.idempotency_ttl_s)
        result.pruned_deliveries = deliveries.prune_finished(session,
                                                             settings.webhooks.history_days)
    return result


def wake_queued_jobs(
    queues: Collection[str] | None = None,
    count_waiting: Callable[[str], int] = count_waiting_messages,
    send: Callable[[str, str], bool] = enqueue_training,
) -> list[str]:
    """Send one wake-up per queued job whose class's queue has no waiting message for it, in
    each of `queues` (None: every configured class's).

    A wake-up names a job but serves any of its class: the worker claims the fairest QUEUED
    job of its class (`jobs.claim_next`), whichever it names. So each class's queue needs as
    many waiting messages as the class has queued jobs, not a message per particular job,
    and a count is enough to know how many are missing.
    """
    woken = []
    for queue in configured_queues(get_settings()) if queues is None else queues:
        with session_scope() as session:
            queued = jobs.count_queued(session, device_class=queue)
            if not queued:
                continue
            missing = queued - count_waiting(queue)
            if missing <= 0:
                continue
            job_ids = jobs.queued_job_ids(session, missing, device_class=queue)
        woken += [job_id for job_id in job_ids if send(job_id, queue)]
    return woken


def unserved_class_warning(device_class: str, configured: Collection[str]) -> str:
    return (f"device class {device_class!r} is not configured on this service (its "
            f"TUNERY_DEVICE_CLASSES has {', '.join(configured)}): no worker takes this job "
            "until an operator adds the class back; cancel it and submit it again to route it "
            "to a class there is")


def warn_unserved_jobs(queues: Collection[str]) -> list[str]:
    """Give each QUEUED job of a class that is none of `queues` a warning, once, that no
    worker takes it (at most `UNSERVED_BATCH` per sweep). Returns the jobs warned now."""
    with session_scope() as session:
        unwarned = [(job.id, warning) for job in jobs.queued_outside(session, queues)
                    if (warning := unserved_class_warning(job.device_class, queues))
                    not in job.warnings]
        return [job_id for job_id, warning in unwarned[:UNSERVED_BATCH]
                if jobs.warn_queued_job(session, job_id, warning)]


def release_dead_worker(pid: int, death: str) -> list[tuple[str, JobStatus]]:
    """Move the jobs of the worker process `pid` of this host, which its supervisor saw exit,
    on from their lost attempt at once (`jobs.requeue_dead_owner`; `death` says how it went),
    and send the wake-ups the re-queued ones now need: the dead worker's own message went
    with it (the embedded transport) or stays unacknowledged until the visibility timeout
    (Redis). Returns (job id, new status)."""
    with session_scope() as session:
        moved = jobs.requeue_dead_owner(session, jobs.worker_identity(pid), death)
    if any(status is JobStatus.QUEUED for _, status in moved):
        wake_queued_jobs()
    return moved


def sweep(settings: Settings) -> SweepResult:
    result = reap(settings)
    queues = configured_queues(settings)
    result.woken = wake_queued_jobs(queues)
    result.unserved = warn_unserved_jobs(queues)
    if settings.retention.checkpoint_days or settings.retention.artifact_days:
        # Last: a storage outage must not hold up the re-queues and wake-ups above.
        result.retention = apply_retention(settings.retention, storage_from_settings(settings))
    for what, ids in (
        ("re-queued after a lost lease", result.requeued),
        ("failed after their last attempt was lost", result.failed),
        ("cancelled while their worker was lost", result.cancelled),
        ("paused while their worker was lost", result.paused),
        ("failed past the hard time limit", result.timed_out),
        ("woken: the broker had no message for them", result.woken),
        ("wait for a device class not configured here (TUNERY_DEVICE_CLASSES)",
         result.unserved),
    ):
        if ids:
            log.warning("maintenance: %d job(s) %s: %s", len(ids), what, ", ".join(ids))
    return result


class MaintenanceLoop(threading.Thread):
    """`sweep()` every `settings.leases.reaper_interval_s` until `stop()`; an outage of the database
    or the broker is logged and retried at the next tick, never fatal."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="tunery-maintenance", daemon=True)
        self.settings = settings
        self._stopped = threading.Event()
        self.orphans = OrphanedDatasetObjects(grace_s=ORPHAN_SWEEP_EVERY_S)
        self._orphans_swept_at: float | None = None

    def run(self) -> None:
        while True:
            try:
                sweep(self.settings)
            except Exception as exc:  # noqa: BLE001 - an outage must not end the loop
                log.warning("maintenance sweep failed (will retry): %s", exc)
            self._sweep_orphans()
            if self._stopped.wait(self.settings.leases.reaper_interval_s):
                return

    def _sweep_orphans(self) -> None:
        """Every `ORPHAN_SWEEP_EVERY_S`: it lists every dataset's folder, too much for each
        tick."""
        now = time.monotonic()
        if self._orphans_swept_at is not None and (
                now - self._orphans_swept_at < ORPHAN_SWEEP_EVERY_S):
            return
        self._orphans_swept_at = now
        try:
            self.orphans.sweep(storage_from_settings(self.settings))
        except Exception as exc:  # noqa: BLE001 - an outage must not end the loop
            log.warning("maintenance: looking for dataset files without a dataset failed "
                        "(will retry): %s", exc)

    def stop(self) -> None:
        self._stopped.set()
