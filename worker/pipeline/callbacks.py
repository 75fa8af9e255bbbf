"""Trainer callbacks that connect a training run to its `JobReporter` and to storage, and
`TrainingWatch`, the set every trainer (supervised, ORPO) runs with."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    EarlyStoppingCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from shared.schema import TrainingConfig
from worker.metrics import TOKENS_PER_SECOND, TRAINING_STEPS
from worker.pipeline.checkpoint_uploads import BackgroundUploads
from worker.pipeline.checkpoints import BEST_ADAPTER_FILE, CheckpointStore, StoredCheckpoint
from worker.pipeline.errors import HAND_BACK_REASONS, StopReason, TrainingStopped
from worker.pipeline.lora_init import save_initial_adapter
from worker.pipeline.ranks import (
    StopAgreement,
    assign_whole,
    in_process_group,
    is_main_process,
    whole,
)
from worker.pipeline.report import CheckpointSavedFn, JobReporter, no_checkpoint_report
from worker.pipeline.token_accuracy import EVAL_ACCURACY, TRAIN_ACCURACY


def format_duration(seconds: float) -> str:
    """`45s`, `1m20s`, `2h05m`: short enough for a log line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _present(logs: Mapping[str, float], key: str) -> dict[str, float]:
    return {key: float(logs[key])} if logs.get(key) is not None else {}


def _accuracy_text(values: Mapping[str, float], key: str) -> str:
    return f" | {key} {values[key]:.4f}" if key in values else ""


class MetricsCallback(TrainerCallback):
    """Turns every Trainer log into a metric record and one user-visible log line.

    tokens/s counts non-padding tokens (`include_num_input_tokens_seen="non_padding"`) over
    wall time, evaluation time excluded; a run that counts no tokens
    (`include_num_input_tokens_seen="no"`) reports none. The ETA extrapolates the wall time per
    step since the run's first step ended, evaluations included, since they recur at the same
    pace until the end; until a second step has ended there is none (`eta –`, no `eta_s`).
    The mean token accuracy, where the trainer logs it (`TuneryTrainer`; TRL's trainers do
    not), goes next to its loss.

    `extra` maps further Trainer log keys (a TRL trainer's own numbers) to the metric names
    they are recorded under; they are appended to the log line too. `clock` gives seconds.
    """

    def __init__(
        self,
        reporter: JobReporter,
        extra: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.reporter = reporter
        self.extra = dict(extra or {})
        self.clock = clock
        self._last_time = 0.0
        self._last_tokens = 0
        # (time, step) when this run's first step ended: the pace counts from there, because
        # the first step also pays for warm-up (compilation, kernel autotuning, allocator
        # growth) and a short job's ETA extrapolated from it is many times too long.
        self._paced_from: tuple[float, int] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_time = self.clock()
        self._last_tokens = state.num_input_tokens_seen
        self._paced_from = None
        loader = kwargs.get("train_dataloader")
        examples = f" of {len(loader.dataset)} examples" if loader is not None else ""
        epochs = args.num_train_epochs
        resumed = f", resuming at step {state.global_step}" if state.global_step else ""
        devices = f" x {args.world_size} devices" if args.world_size > 1 else ""
        self.reporter.log(
            f"training {state.max_steps} step{'s' if state.max_steps != 1 else ''}: "
            f"{epochs:g} epoch{'s' if epochs != 1 else ''}"
            f"{examples}, batch {args.per_device_train_batch_size} x "
            f"{args.gradient_accumulation_steps}{devices}, optimizer "
            f"{getattr(args.optim, 'value', args.optim)}{resumed}"
        )

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_time = self.clock()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        TRAINING_STEPS.inc()
        # A resumed run starts past step 0: its first step is the first one it trains.
        if self._paced_from is None:
            self._paced_from = (self.clock(), state.global_step)

    def eta_s(self, now: float, step: int, total: int) -> float | None:
        """Seconds left after `step` of `total` at the pace of the steps after the run's
        first; None until a second step has ended."""
        if self._paced_from is None:
            return None
        since, from_step = self._paced_from
        if step <= from_step:
            return None
        return (now - since) / (step - from_step) * max(total - step, 0)

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
        step, total, epoch = state.global_step, state.max_steps, float(state.epoch or 0.0)
        percent = 100.0 * step / total if total else 0.0
        # Epochs are counted from 1; epoch 1.0 exactly is still the first one.
        head = f"epoch {max(1, math.ceil(epoch))} | step {step}/{total} ({percent:.0f}%)"
        if "eval_loss" in logs:
            evaluated = {"epoch": epoch, "eval_loss": float(logs["eval_loss"])}
            evaluated.update(_present(logs, EVAL_ACCURACY))
            self.reporter.metric(step, evaluated)
            self.reporter.log(f"{head} | eval_loss {evaluated['eval_loss']:.4f}"
                              f"{_accuracy_text(evaluated, EVAL_ACCURACY)}")
            return
        if "loss" not in logs:
            return  # the end-of-training summary; its numbers were all reported already
        now, tokens = self.clock(), state.num_input_tokens_seen
        tokens_per_s = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        eta_s = self.eta_s(now, step, total)
        loss = float(logs["loss"])
        counts_tokens = args.include_num_input_tokens_seen != "no"
        values = {
            "epoch": epoch,
            "loss": loss,
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "total_steps": float(total),
            "percent": percent,
        }
        if eta_s is not None:
            values["eta_s"] = eta_s
        if counts_tokens:
            values["tokens_per_s"] = tokens_per_s
            TOKENS_PER_SECOND.set(tokens_per_s)
        if logs.get("grad_norm") is not None:
            values["grad_norm"] = float(logs["grad_norm"])
        values.update(_present(logs, TRAIN_ACCURACY))
        extra = {name: float(logs[key]) for key, name in self.extra.items() if key in logs}
        values.update(extra)
        self.reporter.metric(step, values)
        throughput = f"{tokens_per_s:.0f} tok/s | " if counts_tokens else ""
        more = "".join(f" | {name} {value:.4f}" for name, value in extra.items())
        eta = format_duration(eta_s) if eta_s is not None else "–"
        self.reporter.log(
            f"{head} | loss {loss:.4f}{_accuracy_text(values, TRAIN_ACCURACY)} | "
            f"lr {values['learning_rate']:.1e} | "
            f"{throughput}eta {eta}{more}"
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
    """Polls `should_stop()` after every optimizer step, every micro-batch of gradient
    accumulation and every evaluation batch: neither a long step nor an evaluation delays a
    stop by more than one batch.

    After a step, training ends at that step: its metrics are still logged and the evaluation
    the Trainer may have planned for it is skipped. After a micro-batch, training ends before
    the step's optimizer update, at the last whole step. During an evaluation, the evaluation
    is cut short by raising `TrainingStopped` from the Trainer's loop; nothing else runs
    between two evaluation batches, no database write nor upload, so nothing is cut in two.

    A stop for one of `save_on` (a time limit: the job is worth going on with later) waits for
    the end of the step, whose checkpoint it saves; any other (a cancel, a lost lease: another
    attempt owns the job) saves nothing. `run_trainer` raises `TrainingStopped` once the
    Trainer returns.

    With `saves_hand_backs`, a stop that hands the job back to be continued (a pause, the
    worker stopping) ends the step as an uninterrupted run would end it (the evaluation
    planned for it, then its checkpoint) and stops after that save, so that the resumed run
    is the uninterrupted one and no step is trained twice; one that comes as training ends
    anyway (its last step, early stopping) is no stop: the job finishes. Without, they stop
    like a cancel, and the next attempt resumes from the last checkpoint saved on schedule.
    """

    def __init__(
        self, reporter: JobReporter, save_on: frozenset[StopReason] = frozenset(),
        *, saves_hand_backs: bool = False,
        should_stop: Callable[[], StopReason | None] | None = None,
    ) -> None:
        self.reporter = reporter
        # Where stop requests come from: the reporter's, or in a process group the reason
        # its ranks agreed on (`ranks.StopAgreement`).
        self.should_stop = should_stop or reporter.should_stop
        self.saves_hand_backs = saves_hand_backs
        self.save_on = (save_on | HAND_BACK_REASONS) if saves_hand_backs else save_on
        self.reason: StopReason | None = None
        self.step: int | None = None
        self._handing_back: StopReason | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        reason = self.should_stop()
        if reason in HAND_BACK_REASONS and self.saves_hand_backs:
            # Stopped in `on_save`, after the step's evaluation and checkpoint.
            self._handing_back = reason
            control.should_save = True
        elif reason:
            self._stop(reason, state, control)
            control.should_save = reason in self.save_on

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        reason, self._handing_back = self._handing_back, None
        # Already set: the Trainer stops here by itself (the last step, early stopping).
        if reason is not None and not control.should_training_stop:
            self._stop(reason, state, control)

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        reason = self._stop_now()
        if reason:
            self._stop(reason, state, control)
            control.should_save = False

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        reason = self._stop_now()
        if reason:
            self._stop(reason, state, control)
            raise TrainingStopped(reason, step=state.global_step)

    def _stop_now(self) -> StopReason | None:
        """A reason to stop before the step ends: any but those that save the step."""
        reason = self.should_stop()
        return None if reason in self.save_on else reason

    def _stop(self, reason: StopReason, state: TrainerState, control: TrainerControl) -> None:
        self.reason, self.step = reason, state.global_step
        control.should_training_stop = True
        control.should_evaluate = False


class BestAdapterCallback(TrainerCallback):
    """Keeps a copy of the trainable weights at the best `eval_loss`; puts it back at the end.

    The copy lives in host memory: a LoRA adapter is megabytes, so this costs far less than
    the Trainer's `load_best_model_at_end`, which writes a full checkpoint (optimizer state
    included) at every evaluation and ties the save schedule to the eval schedule. The
    evaluation before training (step 0) is a candidate too: if training only made eval_loss
    worse, the untrained adapter is the best one.

    With `keep_weights` False (a full fine-tune, where a copy would be a second whole model
    in host memory) only the best eval_loss and its step are recorded: the last step's
    weights are kept.
    """

    def __init__(self, keep_weights: bool = True) -> None:
        self.keep_weights = keep_weights
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.restored = False
        self._weights: dict[str, torch.Tensor] = {}

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        loss = (metrics or {}).get("eval_loss")
        if loss is None or model is None:
            return
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = float(loss), state.global_step
            if not self.keep_weights:
                return
            # Whole tensors even under FSDP2, where each rank holds a shard: what is saved
            # with a checkpoint must be the whole adapter.
            self._weights = {
                name: whole(param.detach()).to("cpu", copy=True)
                for name, param in model.named_parameters()
                if param.requires_grad
            }

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self._weights or model is None or self.best_step == state.global_step:
            return  # the model already holds the best weights
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self._weights:
                    assign_whole(param, self._weights[name])
        self.restored = True

    def save_into(self, checkpoint_dir: Path) -> None:
        """Write the best weights so far into a local checkpoint: an attempt resumed from it
        sees only later evaluations and would otherwise keep a worse adapter than an
        uninterrupted run."""
        if not self._weights:
            return
        from safetensors.torch import save_file

        metadata = {"best_loss": repr(self.best_loss), "best_step": str(self.best_step)}
        save_file(self._weights, str(checkpoint_dir / BEST_ADAPTER_FILE), metadata=metadata)

    def load_checkpoint(self, checkpoint_dir: Path) -> None:
        """Take over the best weights an interrupted attempt saved with its checkpoint."""
        path = checkpoint_dir / BEST_ADAPTER_FILE
        if not path.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as saved:
            metadata = saved.metadata()
            self._weights = {name: saved.get_tensor(name) for name in saved.keys()}  # noqa: SIM118
        self.best_loss, self.best_step = float(metadata["best_loss"]), int(metadata["best_step"])


def early_stopping(patience: int, resume_from: Path | None = None) -> EarlyStoppingCallback:
    """Early stopping on eval_loss; resuming from a checkpoint, with the evaluations without
    improvement counted by then. The Trainer restores the best eval_loss from the checkpoint
    but not this count (it would with `restore_callback_states_from_checkpoint`, which also
    brings back the control flags of the moment of the save, a pending save among them), and
    a resumed run would otherwise stop later than the uninterrupted one."""
    callback = EarlyStoppingCallback(patience)
    if resume_from is None or not (resume_from / "trainer_state.json").is_file():
        return callback
    stored = json.loads((resume_from / "trainer_state.json").read_text()).get(
        "stateful_callbacks", {}).get(type(callback).__name__)
    if isinstance(stored, list):  # one entry per callback of the class
        stored = stored[0] if stored else None
    counted = (stored or {}).get("attributes", {}).get("early_stopping_patience_counter")
    if isinstance(counted, int):
        callback.early_stopping_patience_counter = counted
    return callback


class CheckpointCallback(TrainerCallback):
    """After the Trainer saves `checkpoint-N/` locally: add the best adapter so far to it
    (with a validation set), then copy it to storage, in that order, so that the checkpoint in
    storage carries the best adapter.

    The copy runs in the background (`BackgroundUploads`): training goes on while storage is
    slow or away for less than its retry deadline. An upload that failed past it stops
    training at the next step (`StopReason.STORAGE_UNAVAILABLE`): the job goes back to the
    queue rather than train on without checkpoints. `run_trainer` waits for the last upload
    (`wait_for_uploads`) before anything else happens to the job.

    In a process group only rank 0 has this callback, and it stops nothing itself
    (`stops_training` False): the failed upload is a stop request its ranks agree on
    (`TrainingWatch`), since a rank that stopped alone would leave the others waiting.
    """

    def __init__(
        self, store: CheckpointStore, best: BestAdapterCallback | None,
        saved: CheckpointSavedFn = no_checkpoint_report, *, stops_training: bool = True,
    ) -> None:
        self.best = best
        self.saved = saved
        self.stops_training = stops_training
        self.uploads = BackgroundUploads(store, self._uploaded)

    def upload_failed(self) -> bool:
        return self.uploads.error is not None

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert args.output_dir is not None  # training_arguments always sets one
        local_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.best is not None:
            self.best.save_into(local_dir)
        if kwargs.get("model") is not None:
            save_initial_adapter(kwargs["model"], local_dir)
        if self.uploads.error is None:
            self.uploads.start(state.global_step, local_dir)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.stops_training and self.upload_failed():
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False

    def _uploaded(self, checkpoint: StoredCheckpoint) -> None:
        size = sum(checkpoint.files.values())
        self.saved(checkpoint.step,
                   f"checkpoint at step {checkpoint.step} saved to storage ({size / 1e6:.1f} MB)")


class TrainingWatch:
    """The callbacks every training run gets: metrics and log lines, progress, cancel, and with
    a validation set early stopping and the best adapter; with `checkpoints`, uploads (by rank
    0 alone in a process group, whose ranks agree on every stop: `ranks.StopAgreement`)."""

    def __init__(
        self,
        reporter: JobReporter,
        config: TrainingConfig,
        *,
        has_validation: bool,
        checkpoints: CheckpointStore | None = None,
        extra_metrics: Mapping[str, str] | None = None,
        resume_from: Path | None = None,
        keep_best_weights: bool = True,
    ) -> None:
        self.reporter = reporter
        self.metrics = MetricsCallback(reporter, extra=extra_metrics)
        saves = checkpoints is not None and checkpoints.every_steps > 0
        # A job stopped by its time limit keeps a checkpoint of where it got to; a paused job
        # and one whose worker stops too, even where no checkpoint is saved along the way:
        # the next attempt continues from it.
        save_on = frozenset({StopReason.TIMEOUT}) if saves else frozenset()
        group = in_process_group()
        self.agreement = StopAgreement(self._stop_request) if group else None
        self.stop = StopCallback(reporter, save_on=save_on,
                                 saves_hand_backs=checkpoints is not None,
                                 should_stop=self.agreement.agreed if self.agreement else None)
        self.best = BestAdapterCallback(keep_weights=keep_best_weights)
        if resume_from:
            # The best adapter so far lives in the checkpoint, not in this process's memory.
            self.best.load_checkpoint(resume_from)
        self.callbacks: list[TrainerCallback] = [
            *([self.agreement] if self.agreement else []),
            self.metrics,
            ProgressReportCallback(reporter),
            self.stop,
        ]
        if has_validation:
            self.callbacks += [early_stopping(config.early_stopping_patience, resume_from),
                               self.best]
        self.checkpoint_uploads: CheckpointCallback | None = None
        if checkpoints is not None and is_main_process():
            best = self.best if has_validation else None
            self.checkpoint_uploads = CheckpointCallback(
                checkpoints, best, reporter.checkpoint_saved, stops_training=not group)
            self.callbacks.append(self.checkpoint_uploads)

    def _stop_request(self) -> StopReason | None:
        """Rank 0's reason to stop a process group: the reporter's, or a checkpoint that
        could not be uploaded."""
        uploads = self.checkpoint_uploads
        if uploads is not None and uploads.upload_failed():
            return StopReason.STORAGE_UNAVAILABLE
        return self.reporter.should_stop()

    def wait_for_uploads(self) -> BaseException | None:
        """Wait until the last checkpoint upload has ended; returns why it failed, if it did
        (storage unreachable past its retry deadline)."""
        if self.checkpoint_uploads is None:
            return None
        try:
            self.checkpoint_uploads.uploads.wait()
        except Exception as exc:
            return exc
        return None
