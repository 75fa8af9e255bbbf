"""How the pipeline talks to whoever runs it: phases, log lines, metrics, progress, stop.

`worker.job_reporter.DatabaseReporter` implements `JobReporter` against the database; tests use
`RecordingReporter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from worker.pipeline.errors import StopReason

PHASES = ("loading_data", "loading_model", "training", "uploading")
METRIC_KEYS = frozenset(
    {
        "epoch",
        "loss",
        "eval_loss",
        "learning_rate",
        "tokens_per_s",
        "grad_norm",
        "total_steps",
        "percent",
        "eta_s",
        # Beside the losses (`token_accuracy`); DPO's TRL trainer logs its own.
        "mean_token_accuracy",
        "eval_mean_token_accuracy",
        # ORPO and DPO runs only (preference.py).
        "nll_loss",
        "log_odds_ratio",
        "reward_margin",
        "reward_accuracy",
        "reward_chosen",
        "reward_rejected",
    }
)

# How a warning's log line starts.
WARNING_PREFIX = "warning: "

# Where a pipeline function writes its user-visible log lines; usually `JobReporter.log`.
LogFn = Callable[[str], None]


def no_log(line: str) -> None:
    """The `LogFn` that drops every line: the default of functions whose caller may not care."""


# Where a checkpoint upload reports its step and log line; usually
# `JobReporter.checkpoint_saved`.
CheckpointSavedFn = Callable[[int, str], None]


def no_checkpoint_report(step: int, line: str) -> None:
    """The `CheckpointSavedFn` that drops the report."""


class JobReporter(Protocol):
    def phase(self, name: str) -> None:
        """The job entered `name`, one of `PHASES`."""

    def log(self, line: str) -> None:
        """One user-visible log line, e.g. `epoch 1 | step 5/40 (12%) | loss 2.31 | ...`."""

    def warn(self, warning: str) -> None:
        """A sentence the user must read with the job's outcome (a warm-up cut to fit the run,
        the default template used): logged as `warning: ...` and kept in the job's warnings."""

    def metric(self, step: int, values: dict[str, float]) -> None:
        """Metrics at optimizer step `step`; keys among `METRIC_KEYS`."""

    def progress(self, fraction: float) -> None:
        """Training progress in [0, 1]: optimizer steps done over steps planned."""

    def checkpoint_saved(self, step: int, line: str) -> None:
        """The checkpoint of optimizer step `step` is in storage; `line` is the log line that
        says so. News for the job's webhooks, written with the line."""

    def should_stop(self) -> StopReason | None:
        """Polled after every optimizer step: a reason stops training."""


@dataclass
class RecordingReporter:
    """A `JobReporter` that keeps everything in lists.

    `request_stop(reason)` simulates a user cancelling; `stop_after_step=n` does so as soon as
    the metrics of step n are recorded, i.e. while training is under way.
    """

    phases: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    stop_after_step: int | None = None
    stop_reason: StopReason | None = None
    polls: int = 0

    def phase(self, name: str) -> None:
        self.phases.append(name)

    def log(self, line: str) -> None:
        self.lines.append(line)

    def warn(self, warning: str) -> None:
        self.log(f"{WARNING_PREFIX}{warning}")
        if warning not in self.warnings:
            self.warnings.append(warning)

    def metric(self, step: int, values: dict[str, float]) -> None:
        self.metrics.append((step, dict(values)))
        if self.stop_after_step is not None and step >= self.stop_after_step:
            self.request_stop(StopReason.CANCELLED)

    def progress(self, fraction: float) -> None:
        self.fractions.append(fraction)

    def checkpoint_saved(self, step: int, line: str) -> None:
        self.checkpoints.append(step)
        self.log(line)

    def should_stop(self) -> StopReason | None:
        self.polls += 1
        return self.stop_reason

    def request_stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def values(self, key: str) -> list[float]:
        """Every recorded value of metric `key`, in order."""
        return [values[key] for _step, values in self.metrics if key in values]

    def steps(self, key: str) -> list[int]:
        """The steps at which metric `key` was recorded, in order."""
        return [step for step, values in self.metrics if key in values]
