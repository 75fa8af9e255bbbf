"""The two ways a job ends early on purpose; anything else escaping run_job is a bug."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix in the request or the data; the message tells them how."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TrainingStopped(Exception):
    """Training stopped because `JobReporter.should_stop()` returned `reason` (e.g. "cancelled")."""

    def __init__(self, reason: str, step: int | None = None) -> None:
        super().__init__(reason if step is None else f"{reason} (at step {step})")
        self.reason = reason
        self.step = step
