"""`TuneryTrainer`: transformers' Trainer with the loss at labelled positions only and the
training batches of `batching`; `run_trainer`, which runs any Trainer (this one, TRL's) with a
`TrainingWatch` and says how it ended."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer

from shared.schema import LoggingConfig, TrainingConfig
from shared.storage import StorageUnreachable
from worker.pipeline.callbacks import TrainingWatch
from worker.pipeline.errors import StopReason, TrainingStopped
from worker.pipeline.labelled_loss import (
    CausalLMParts,
    causal_lm_parts,
    decoder_inputs,
    labelled_causal_lm_loss,
    shifted_labels,
)
from worker.pipeline.ranks import describe_process_group, in_process_group
from worker.pipeline.token_accuracy import EVAL_ACCURACY, TRAIN_ACCURACY, TokenAccuracy
from worker.pipeline.wandb_reporting import WandbTimeouts, wandb_reporting


@dataclass
class TrainStats:
    steps: int
    first_loss: float | None
    last_loss: float | None
    best_eval_loss: float | None = None
    best_step: int | None = None
    trained_tokens: int | None = None
    """Tokens the training steps read, padding not counted, all epochs (and every attempt's
    steps, as the trainer state carries the count across a resume); None where not counted."""


class TuneryTrainer(Trainer):
    """Four changes to `Trainer`, nothing else:

    - `compute_loss` runs the decoder and then the LM head only where a label is
      (`labelled_loss`), for training and evaluation alike; the value is the model's own
      loss, normalised the same way, so eval_loss means what it always meant. Where that
      cannot be guaranteed it is the Trainer's own `compute_loss` (see `_labelled_loss_parts`).
    - with `train_batches`, a batch sampler (`batching.LengthBucketBatches`), the training
      batches are its batches; evaluation keeps the Trainer's fixed-size sequential batches.
    - with `batch_slices` > 1 (a lower rung of `worker.memory_ladder`), each training batch
      runs as that many slices of its rows, one forward and backward each: the gradient and
      the loss are the batch's, since every slice's loss is normalised by the step's
      `num_items_in_batch`, and only a slice's activations are alive at a time.
    - every log of a training loss carries the mean token accuracy, and every evaluation's
      its own (`token_accuracy`): from the logits each loss computes
      anyway, counted over the labelled positions of all micro-batches since the last log
      (a step's, with the Trainer logging every step), and over all ranks of a process group.
    """

    def __init__(
        self,
        *args: Any,
        train_batches: torch.utils.data.Sampler[list[int]] | None = None,
        batch_slices: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_batches = train_batches
        self.batch_slices = batch_slices
        self.train_accuracy = TokenAccuracy()
        self.eval_accuracy = TokenAccuracy()

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        rows = _rows(inputs)
        # Without `num_items_in_batch` each slice's loss would be its own mean, and the sum of
        # the slices' losses not the batch's.
        if self.batch_slices == 1 or num_items_in_batch is None or rows < 2:
            return super().training_step(model, inputs, num_items_in_batch)
        total: torch.Tensor | None = None
        for part in torch.arange(rows).tensor_split(min(self.batch_slices, rows)):
            piece = {key: value[part[0]:part[-1] + 1] if _is_per_row(value, rows) else value
                     for key, value in inputs.items()}
            loss = super().training_step(model, piece, num_items_in_batch)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def get_train_dataloader(self) -> Any:
        if self.train_batches is None:
            return super().get_train_dataloader()
        loader = torch.utils.data.DataLoader(
            self.train_dataset,  # type: ignore[arg-type]
            batch_sampler=self.train_batches,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        # Single-process: accelerate keeps the batch sampler, and the Trainer's `set_epoch`
        # reaches it through the prepared loader.
        return self.accelerator.prepare(loader)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        # The Trainer evaluates with the model in eval mode and trains with it in train mode.
        accuracy = self.train_accuracy if model.training else self.eval_accuracy
        parts = self._labelled_loss_parts(model, inputs, return_outputs=return_outputs)
        if parts is None:
            return self._model_loss(model, inputs, accuracy, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        # accelerate applies mixed precision by wrapping the model's forward, which this path
        # does not call: without the same autocast here a bf16 run would compute LoRA in fp32.
        with self.accelerator.autocast():
            # The cache is useless in training; the full forward builds one only to drop it.
            hidden = parts.decoder(**decoder_inputs(inputs), use_cache=False).last_hidden_state
            loss = labelled_causal_lm_loss(
                hidden, inputs["labels"], parts.lm_head, num_items_in_batch=num_items_in_batch,
                accuracy=accuracy,
            )
        # Normalised by `num_items_in_batch` when given, as the model's own loss: the Trainer's
        # default `loss_is_scaled_for_ga` then treats it exactly as it treats the model's.
        # Evaluation asks for outputs only to read logits, which it drops without
        # compute_metrics (checked in `_labelled_loss_parts`).
        return (loss, {"loss": loss}) if return_outputs else loss

    def _model_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        accuracy: TokenAccuracy,
        *,
        return_outputs: bool,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> Any:
        """The Trainer's own loss (the model's), with the accuracy read from its logits."""
        targets = inputs.get("shift_labels")
        if targets is None and "labels" in inputs:
            targets = shifted_labels(inputs["labels"])
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if targets is not None and isinstance(logits, torch.Tensor):
            accuracy.add_logits(logits, targets)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self._add_accuracy(logs, TRAIN_ACCURACY, self.train_accuracy)
        elif "eval_loss" in logs:
            self._add_accuracy(logs, EVAL_ACCURACY, self.eval_accuracy)
        super().log(logs, start_time)

    def _add_accuracy(self, logs: dict[str, float], key: str, accuracy: TokenAccuracy) -> None:
        # Every rank logs the same losses at the same points (the loss is itself gathered
        # there), so every rank reaches this sum.
        group = self.accelerator.num_processes > 1
        value = accuracy.take(self._sum_over_ranks if group else None)
        if value is not None:
            logs[key] = value

    def _sum_over_ranks(self, counts: torch.Tensor) -> torch.Tensor:
        summed: torch.Tensor = self.accelerator.reduce(counts.to(self.args.device),
                                                       reduction="sum")
        return summed

    def _labelled_loss_parts(
        self, model: torch.nn.Module, inputs: dict[str, Any], *, return_outputs: bool
    ) -> CausalLMParts | None:
        """The model's decoder and LM head when the labelled loss equals the Trainer's own
        loss; None otherwise."""
        if "labels" not in inputs or "shift_labels" in inputs:
            return None
        # Label smoothing and custom loss functions change the loss itself.
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return None
        # Metrics would need the logits this path never computes.
        if return_outputs and self.compute_metrics is not None:
            return None
        # Calling the decoder directly would bypass a DDP/DeepSpeed wrapper's gradient sync,
        # and several processes rescale the loss (average_tokens_across_devices); the worker
        # trains in one process, where this never applies.
        if self.accelerator.num_processes != 1 or self.accelerator.unwrap_model(model) is not model:
            return None
        return causal_lm_parts(model)


def _rows(inputs: dict[str, Any]) -> int:
    ids = inputs.get("input_ids")
    return int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 0


def _is_per_row(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows


def run_trainer(
    trainer: Trainer,
    watch: TrainingWatch,
    config: TrainingConfig,
    *,
    output_dir: Path,
    resume_from: Path | None = None,
    logging: LoggingConfig | None = None,
    wandb_timeouts: WandbTimeouts,
) -> TrainStats:
    """Run `trainer` (built with `watch.callbacks`) and say how it ended, in log lines and
    `TrainStats`; raises `TrainingStopped` if the reporter asked to stop. With
    `logging.use_wandb`, W&B gets `wandb_timeouts` to start and to finish its run."""
    reporter, stop, best = watch.reporter, watch.stop, watch.best
    # Log lines go to the reporter; the Trainer's own printer would duplicate them on stdout.
    trainer.remove_callback(PrinterCallback)
    if in_process_group():
        reporter.log(describe_process_group(trainer))
    if config.lr_scheduler_type == "reduce_lr_on_plateau":
        reporter.log(
            "reduce_lr_on_plateau: no warm-up; the learning rate halves after an evaluation "
            "without improvement"
        )
    try:
        with wandb_reporting(logging, output_dir, log=reporter.log,
                             timeouts=wandb_timeouts, should_stop=reporter.should_stop):
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except TrainingStopped:
        if stop.reason is None:  # W&B's start, stopped before training began
            raise
        # Otherwise an evaluation cut short (`StopCallback`): told below like any stop.
    finally:
        # Whatever comes next (publishing, a hand-back, the next attempt) needs the last
        # checkpoint in storage, or to know it is not there.
        upload_failed = watch.wait_for_uploads()
    state = trainer.state
    has_validation = trainer.eval_dataset is not None
    # Asked to stop anyway, the job ends as asked: from the last checkpoint that did arrive.
    if upload_failed is not None and stop.reason is None:
        if not isinstance(upload_failed, StorageUnreachable):
            raise upload_failed
        reporter.log(f"training stopped at step {state.global_step}: a checkpoint could not "
                     f"be uploaded: {upload_failed}")
        raise TrainingStopped(StopReason.STORAGE_UNAVAILABLE, step=state.global_step)
    if stop.reason:
        reporter.log(f"training stopped at step {stop.step}: {stop.reason}")
        raise TrainingStopped(stop.reason, step=stop.step)
    if has_validation and state.global_step < state.max_steps:
        patience = config.early_stopping_patience
        reporter.log(
            f"early stopping at step {state.global_step}/{state.max_steps}: eval_loss did not "
            f"improve for {patience} evaluation{'s' if patience > 1 else ''} "
            f"(best {state.best_metric:.4f})"
        )
    if best.restored:
        reporter.log(
            f"kept the adapter of step {best.best_step}, the best eval_loss {best.best_loss:.4f}, "
            f"instead of the last step's"
        )
        if best.best_step == 0:
            reporter.warn(
                f"training never improved on the eval_loss before its first step "
                f"({best.best_loss:.4f}): the adapter kept is the one training started from, "
                f"untrained unless the job continues another job's adapter; a different "
                f"learning_rate, more epochs or more data may help"
            )
    reporter.progress(1.0)
    # From the trainer state, not this run's logs: a resumed run's state carries the earlier
    # attempts' log history, so the first loss is the job's first step's.
    losses = [float(entry["loss"]) for entry in state.log_history if "loss" in entry]
    return TrainStats(
        steps=state.global_step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        best_eval_loss=best.best_loss,
        best_step=best.best_step,
        trained_tokens=int(state.num_input_tokens_seen) or None,
    )
