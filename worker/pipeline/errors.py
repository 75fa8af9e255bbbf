"""The two ways a job ends early on purpose, and why training was asked to stop; anything
else escaping run_job is a bug."""

from __future__ import annotations

from enum import StrEnum


class StopReason(StrEnum):
    """Why a running attempt was asked to stop; set by the heartbeat, read by the pipeline
    (`JobReporter.should_stop()`) and by the attempt, which maps it to the job's outcome."""

    CANCELLED = "cancelled"
    """The user asked."""
    LEASE_LOST = "lease_lost"
    """The job moved on without this attempt; another attempt owns it now."""
    TIMEOUT = "timeout"
    """The attempt ran past its soft time limit."""
    WORKER_STOPPING = "worker_stopping"
    """The worker process is shutting down (`worker.shutdown`); the job goes back to the
    queue."""
    PAUSED = "paused"
    """The user asked to pause (`shared.jobs.request_pause`): training ends at a step, whose
    checkpoint it saves, and the job waits PAUSED until resumed."""
    STORAGE_UNAVAILABLE = "storage_unavailable"
    """Storage stayed unreachable past its retry deadline (`shared.storage_retry`): the job
    goes back to the queue, to resume from its last checkpoint in storage once it is back."""


HAND_BACK_REASONS = frozenset({StopReason.PAUSED, StopReason.WORKER_STOPPING})
"""Stops after which the job is continued by a later attempt, not ended: they save the step
they stop at, so that the next attempt trains no step twice."""


class PipelineError(Exception):
    """A problem the user can fix in the request or the data; the message tells them how."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TrainingStopped(Exception):
    """Training stopped because `JobReporter.should_stop()` returned `reason`."""

    def __init__(self, reason: StopReason, step: int | None = None) -> None:
        reason = StopReason(reason)
        super().__init__(reason.value if step is None else f"{reason.value} (at step {step})")
        self.reason = reason
        self.step = step
