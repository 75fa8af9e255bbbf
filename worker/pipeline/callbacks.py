"""Trainer callbacks that connect a training run to its `JobReporter`."""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from worker.pipeline.report import JobReporter


class MetricsCallback(TrainerCallback):
    """Turns every Trainer log into a metric record and one user-visible log line.

    tokens/s counts non-padding tokens (`include_num_input_tokens_seen="non_padding"`) over
    wall time, evaluation time excluded.
    """

    def __init__(self, reporter: JobReporter) -> None:
        self.reporter = reporter
        self.losses: list[float] = []
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_time = time.perf_counter()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs:
            return
        step, epoch = state.global_step, float(state.epoch or 0.0)
        # Epochs are counted from 1; epoch 1.0 exactly is still the first one.
        head = f"epoch {max(1, math.ceil(epoch))} | step {step}/{state.max_steps}"
        if "eval_loss" in logs:
            eval_loss = float(logs["eval_loss"])
            self.reporter.metric(step, {"epoch": epoch, "eval_loss": eval_loss})
            self.reporter.log(f"{head} | eval_loss {eval_loss:.4f}")
            return
        if "loss" not in logs:
            return  # the end-of-training summary; its numbers were all reported already
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        tokens_per_s = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        loss = float(logs["loss"])
        self.losses.append(loss)
        values = {
            "epoch": epoch,
            "loss": loss,
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "tokens_per_s": tokens_per_s,
        }
        if logs.get("grad_norm") is not None:
            values["grad_norm"] = float(logs["grad_norm"])
        self.reporter.metric(step, values)
        self.reporter.log(
            f"{head} | loss {loss:.4f} | lr {values['learning_rate']:.1e} | "
            f"{tokens_per_s:.0f} tok/s"
        )


class ProgressReportCallback(TrainerCallback):
    """Reports the fraction of optimizer steps done after every step."""

    def __init__(self, reporter: JobReporter) -> None:
        self.reporter = reporter

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.max_steps:
            self.reporter.progress(min(1.0, state.global_step / state.max_steps))


class StopCallback(TrainerCallback):
    """Polls `should_stop()` after every optimizer step and ends training at that step.

    The step's metrics are still logged; the evaluation and save the Trainer may have planned
    for that step are skipped. `train()` raises `TrainingStopped` once the Trainer returns.
    """

    def __init__(self, reporter: JobReporter) -> None:
        self.reporter = reporter
        self.reason: str | None = None
        self.step: int | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        reason = self.reporter.should_stop()
        if reason:
            self.reason, self.step = reason, state.global_step
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_save = False
