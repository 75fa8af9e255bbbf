"""The worker's Prometheus metrics, all defined here: the attempt, its heartbeat, its reporter
and the training callbacks record into them, and `worker.metrics_server` serves them.

One worker process trains one job at a time (the solo pool), so the gauges describe the job
running now, and each process is scraped on a port of its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.models import JobStatus

# How an attempt ended, as this worker saw it. "lost": no outcome of its own was recorded,
# because its lease was lost, a newer attempt or a cancel owns the job, or the database stayed
# unreachable.
LOST = "lost"
OUTCOME_OF_STATUS = {
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.QUEUED: "handed_back",
    JobStatus.PAUSED: "paused",
}
OUTCOMES = (*OUTCOME_OF_STATUS.values(), LOST)

# From seconds (a phase that finds everything cached) to a day (the default time limit).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)

JOBS_STARTED = Counter("tunery_worker_jobs_started",
                       "Attempts this worker started on a job it claimed.")
JOBS_FINISHED = Counter(
    "tunery_worker_jobs_finished", "Attempts this worker ended, by outcome: completed, failed, "
    "cancelled, handed_back (re-queued as the worker stopped), paused, lost (no outcome of its "
    "own recorded: lease lost, superseded, or the database unreachable).", ["outcome"])
JOB_DURATION = Histogram(
    "tunery_worker_job_duration_seconds", "Wall time of an attempt, claim to outcome, by "
    "outcome.", ["outcome"], buckets=DURATION_BUCKETS)
PHASE_DURATION = Histogram(
    "tunery_worker_phase_duration_seconds", "Wall time an attempt spent in each phase: "
    "loading_data, loading_model, training, uploading.", ["phase"], buckets=DURATION_BUCKETS)
TOKENS_PER_SECOND = Gauge(
    "tunery_worker_tokens_per_second", "Non-padding tokens per second of the running job over "
    "its last logged step, evaluations excluded; 0 while no job trains.")
TRAINING_STEPS = Counter("tunery_worker_training_steps",
                         "Optimizer steps this worker trained, over all its jobs.")
LEASE_RENEWALS = Counter(
    "tunery_worker_lease_renewals", "Heartbeat renewals of a running job's lease, by result: "
    "renewed, refused (the job moved on without this attempt), unreachable (database error).",
    ["result"])
LEASES_LOST = Counter(
    "tunery_worker_leases_lost", "Attempts stopped because their lease was lost: the job moved "
    "on, or the database was unreachable for longer than a lease.")

class GpuMemoryCollector(Collector):
    """Memory torch's caching allocator holds on each CUDA device, read when Prometheus
    scrapes: allocated (tensors) and reserved (allocated plus the cache kept for reuse, what
    other processes cannot have). Nothing on a worker without CUDA."""

    def collect(self) -> Iterator[Metric]:
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            "tunery_worker_gpu_memory_allocated_bytes", "GPU memory held by tensors, per "
            "device.", labels=["device"])
        reserved = GaugeMetricFamily(
            "tunery_worker_gpu_memory_reserved_bytes", "GPU memory torch's allocator holds "
            "(tensors and its cache), per device.", labels=["device"])
        # Both read 0 until this process first uses a device; none of these calls creates a
        # CUDA context.
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
            reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved

    def describe(self) -> Iterator[Metric]:
        # Registering must not collect: that would import torch wherever this module is.
        return iter(())


REGISTRY.register(GpuMemoryCollector())

# Every outcome and result is shown from the start, at 0, so that rate() sees the first one.
for _outcome in OUTCOMES:
    JOBS_FINISHED.labels(_outcome)
for _result in ("renewed", "refused", "unreachable"):
    LEASE_RENEWALS.labels(_result)


class AttemptMetrics:
    """One attempt's share of the metrics: counted as started when made, its phases timed as
    it enters them, its outcome (`ended_as`) and duration recorded once, at `end`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started_at = clock()
        self.outcome = LOST
        self._phase: str | None = None
        self._phase_since = self.started_at
        self._ended = False
        JOBS_STARTED.inc()

    def enter_phase(self, name: str) -> None:
        now = self.clock()
        self._close_phase(now)
        self._phase, self._phase_since = name, now

    def ended_as(self, status: JobStatus) -> None:
        """The status this attempt recorded for its job."""
        self.outcome = OUTCOME_OF_STATUS.get(status, LOST)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        now = self.clock()
        self._close_phase(now)
        JOBS_FINISHED.labels(self.outcome).inc()
        JOB_DURATION.labels(self.outcome).observe(now - self.started_at)
        TOKENS_PER_SECOND.set(0)

    def _close_phase(self, now: float) -> None:
        if self._phase is not None:
            PHASE_DURATION.labels(self._phase).observe(now - self._phase_since)
            self._phase = None
