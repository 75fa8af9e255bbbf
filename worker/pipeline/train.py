"""The training stage: transformers' Trainer on the LoRA model, reporting through callbacks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    EarlyStoppingCallback,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from shared.schema import LoggingConfig, TrainingConfig
from worker.pipeline.batching import LengthBucketBatches, choose_layout, flattening_collator
from worker.pipeline.callbacks import (
    BestAdapterCallback,
    MetricsCallback,
    ProgressReportCallback,
    StopCallback,
)
from worker.pipeline.checkpoints import CheckpointStore, CheckpointUploadCallback
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.labels import IGNORE_INDEX, TokenizedExample
from worker.pipeline.memory_plan import checkpoint_if_short_of_memory
from worker.pipeline.model import loaded_dtype
from worker.pipeline.report import JobReporter
from worker.pipeline.trainer import TuneryTrainer
from worker.pipeline.wandb_reporting import wandb_reporting

SEED = 42
DEFAULT_BATCH_SIZE = 4
# About ten evaluations per run: enough for early stopping and reduce_lr_on_plateau to act,
# few enough that evaluation does not dominate a run.
EVAL_EVERY_FRACTION = 0.1
# torch's ReduceLROnPlateau waits 10 evaluations by default, which never happens in ten.
PLATEAU_KWARGS = {"patience": 1, "factor": 0.5}


@dataclass
class TrainStats:
    steps: int
    first_loss: float | None
    last_loss: float | None
    best_eval_loss: float | None = None
    best_step: int | None = None


class PadToLongest:
    """Pads a batch to its longest example: pad id / attention 0 / label -100."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[TokenizedExample | dict[str, Any]]) -> dict[str, Any]:
        rows = [b if isinstance(b, dict) else vars(b) for b in batch]
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class _Examples(torch.utils.data.Dataset):
    """Items as dicts: the Trainer's length-grouped sampler reads `item["input_ids"]`."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


def training_arguments(config: TrainingConfig, **options: Any) -> TrainingArguments:
    """Map the request's training_config onto transformers 5 TrainingArguments; `options` are
    those of `training_argument_values`."""
    return TrainingArguments(**training_argument_values(config, **options))


def training_argument_values(
    config: TrainingConfig,
    *,
    output_dir: Path,
    has_validation: bool,
    quantized: bool,
    dtype: torch.dtype = torch.float32,
    batch_size: int = DEFAULT_BATCH_SIZE,
    save_steps: int = 0,
    wandb_run_name: str | None = None,
) -> dict[str, Any]:
    """`training_arguments` as keyword arguments, for TrainingArguments subclasses (TRL's
    configs) that take the same mapping plus their own fields. `dtype` is the one the base
    model was loaded in (`model.compute_dtype`): half precision trains under autocast."""
    cuda = torch.cuda.is_available()
    scheduler_kwargs = PLATEAU_KWARGS if config.lr_scheduler_type == "reduce_lr_on_plateau" else {}
    evaluation: dict[str, Any] = {"eval_strategy": "no"}
    if has_validation:
        evaluation = {
            "eval_strategy": "steps",
            "eval_steps": EVAL_EVERY_FRACTION,
            # The base model's validation loss: the baseline every later eval_loss is read against.
            "eval_on_start": True,
            "per_device_eval_batch_size": batch_size,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
    # Storage keeps the checkpoints a later attempt resumes from; one local copy is enough.
    saving: dict[str, Any] = {"save_strategy": "no"}
    if save_steps > 0:
        saving = {"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 1}
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        num_train_epochs=config.num_train_epochs,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs,
        # `train()` replaces the Trainer's length-grouped sampler by `LengthBucketBatches`, also
        # when the request leaves group_by_length out; TRL's trainers use this as is.
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        optim=optimizer_name(quantized=quantized, cuda=cuda),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not cuda,
        logging_strategy="steps",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        report_to=["wandb"] if wandb_run_name is not None else "none",
        run_name=wandb_run_name or None,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **evaluation,
        **saving,
    )


def run_argument_values(
    model: Any,
    config: TrainingConfig,
    *,
    has_validation: bool,
    output_dir: Path,
    batch_size: int,
    checkpoints: CheckpointStore | None,
    logging: LoggingConfig | None,
) -> dict[str, Any]:
    """`training_argument_values` for one run of `model`: 4-bit or not, precision,
    checkpoint interval, W&B run name, derived the same way for every trainer."""
    return training_argument_values(
        config,
        output_dir=output_dir,
        has_validation=has_validation,
        quantized=bool(getattr(model, "is_loaded_in_4bit", False)),
        dtype=loaded_dtype(model),
        batch_size=batch_size,
        save_steps=checkpoints.every_steps if checkpoints else 0,
        wandb_run_name=logging.wandb_run_name if logging and logging.use_wandb else None,
    )


def optimizer_name(*, quantized: bool, cuda: bool) -> str:
    """LoRA: torch's fused AdamW, one kernel for all the adapter's tensors (on CPU the default
    AdamW loops over them one by one: 18 ms of a 274 ms SmolLM2 step, 2 ms fused). QLoRA keeps
    AdamW's two moments in 8 bit (bitsandbytes), paged on CUDA.

    bitsandbytes runs 8-bit AdamW on CPU too (same losses as torch's AdamW to 1e-3 on the tiny
    model), but has no paging there: `paged_adamw_8bit` on CPU warns "Paged optimizers are not
    supported on CPU" and behaves as `adamw_8bit`, so CPU asks for that directly.
    """
    if not quantized:
        return "adamw_torch_fused"
    return "paged_adamw_8bit" if cuda else "adamw_8bit"


def train(
    model: Any,
    tokenizer: Any,
    train_set: Sequence[TokenizedExample],
    eval_set: Sequence[TokenizedExample],
    config: TrainingConfig,
    *,
    output_dir: Path,
    reporter: JobReporter,
    batch_size: int = DEFAULT_BATCH_SIZE,
    checkpoints: CheckpointStore | None = None,
    resume_from: Path | None = None,
    logging: LoggingConfig | None = None,
    memory_limit_bytes: float | None = None,
) -> TrainStats:
    """Train the adapter in place; raises `TrainingStopped` if the reporter asks to stop.

    With a validation set, the adapter left in `model` is the one with the best eval_loss.
    With `logging.use_wandb`, the run is also reported to Weights & Biases.

    With `checkpoints`, a checkpoint goes to storage every `checkpoints.every_steps` steps;
    `resume_from` is a downloaded checkpoint to continue from, as if never interrupted.

    Gradient checkpointing turns on by itself when the largest batch would not fit in the
    device's free memory, at most `memory_limit_bytes` (`memory_plan`).
    """
    args = TrainingArguments(
        **run_argument_values(
            model, config, has_validation=bool(eval_set), output_dir=output_dir,
            batch_size=batch_size, checkpoints=checkpoints, logging=logging,
        )
    )
    watch = TrainingWatch(
        reporter, config, has_validation=bool(eval_set), checkpoints=checkpoints,
        resume_from=resume_from,
    )
    layout = choose_layout(model, group_by_length=config.group_by_length)
    collator: Any = PadToLongest(tokenizer.pad_token_id)
    train_batches = None
    longest = max(len(example.input_ids) for example in train_set)
    # A random batch of the longest example: the worst a fixed-size or padding-free batch gets.
    batch_shapes = [(min(batch_size, len(train_set)), longest)]
    if layout == "padding_free":
        collator = flattening_collator()
        reporter.log(f"batches: {batch_size} examples in one row each, without padding")
    elif layout == "length_buckets":
        train_batches = LengthBucketBatches(
            [len(example.input_ids) for example in train_set], batch_size=batch_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )
        reporter.log(
            f"batches: length-bucketed, up to {train_batches.token_budget} tokens (rows x "
            f"longest row), {len(train_batches)} per epoch, "
            f"{100 * train_batches.padding_share():.1f}% padding"
        )
        batch_shapes = train_batches.shapes()
    checkpoint_if_short_of_memory(model, batch_shapes, limit_bytes=memory_limit_bytes,
                                  log=reporter.log)
    trainer = TuneryTrainer(
        model=model,
        args=args,
        train_dataset=_Examples(train_set),
        eval_dataset=_Examples(eval_set) if eval_set else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=watch.callbacks,
        train_batches=train_batches,
    )
    return run_trainer(
        trainer, watch, config, output_dir=output_dir, resume_from=resume_from, logging=logging
    )


class TrainingWatch:
    """The callbacks every training run gets: metrics and log lines, progress, cancel, and with
    a validation set early stopping and the best adapter; with `checkpoints`, uploads."""

    def __init__(
        self,
        reporter: JobReporter,
        config: TrainingConfig,
        *,
        has_validation: bool,
        checkpoints: CheckpointStore | None = None,
        extra_metrics: Mapping[str, str] | None = None,
        resume_from: Path | None = None,
    ) -> None:
        self.reporter = reporter
        self.metrics = MetricsCallback(reporter, extra=extra_metrics)
        # A job stopped by its time limit keeps a checkpoint of where it got to.
        saves = checkpoints is not None and checkpoints.every_steps > 0
        self.stop = StopCallback(reporter, save_on=frozenset({"timeout"}) if saves else frozenset())
        self.best = BestAdapterCallback()
        if resume_from:
            # The best adapter so far lives in the checkpoint, not in this process's memory.
            self.best.load_checkpoint(resume_from)
        self.callbacks: list[TrainerCallback] = [
            self.metrics,
            ProgressReportCallback(reporter),
            self.stop,
        ]
        if has_validation:
            self.callbacks += [EarlyStoppingCallback(config.early_stopping_patience), self.best]
        if checkpoints and checkpoints.every_steps > 0:
            # After `best`: callbacks run in list order, and `best` adds its file to the checkpoint.
            self.callbacks.append(CheckpointUploadCallback(checkpoints, reporter.log))


def run_trainer(
    trainer: Trainer,
    watch: TrainingWatch,
    config: TrainingConfig,
    *,
    output_dir: Path,
    resume_from: Path | None = None,
    logging: LoggingConfig | None = None,
) -> TrainStats:
    """Run `trainer` (built with `watch.callbacks`) and say how it ended, in log lines and
    `TrainStats`; raises `TrainingStopped` if the reporter asked to stop."""
    reporter, stop, best, metrics = watch.reporter, watch.stop, watch.best, watch.metrics
    # Log lines go to the reporter; the Trainer's own printer would duplicate them on stdout.
    trainer.remove_callback(PrinterCallback)
    if config.lr_scheduler_type == "reduce_lr_on_plateau":
        reporter.log(
            "reduce_lr_on_plateau: no warm-up; the learning rate halves after an evaluation "
            "without improvement"
        )
    with wandb_reporting(logging, output_dir, log=reporter.log,
                         should_stop=reporter.should_stop):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state
    has_validation = trainer.eval_dataset is not None
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
    reporter.progress(1.0)
    return TrainStats(
        steps=state.global_step,
        first_loss=metrics.losses[0] if metrics.losses else None,
        last_loss=metrics.losses[-1] if metrics.losses else None,
        best_eval_loss=best.best_loss,
        best_step=best.best_step,
    )
