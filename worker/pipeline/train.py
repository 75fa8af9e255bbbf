"""The supervised recipe: transformers' Trainer on the LoRA model, with the loss on the
labelled tokens only.

It reads top to bottom: batch layout → batches → memory plan → trainer → run. The pieces it
shares with ORPO and DPO (`preference.train_preference`) live in their own modules: the arguments
(`training_args`), the callbacks (`callbacks.TrainingWatch`), the trainer and the run
(`trainer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainingArguments

from shared.schema import LoggingConfig, TrainingConfig
from shared.training_plan import micro_batch_size
from worker.memory_ladder import Rung
from worker.pipeline.batching import (
    ExampleDataset,
    LengthBucketBatches,
    PadToLongest,
    choose_layout,
    flattening_collator,
)
from worker.pipeline.callbacks import TrainingWatch
from worker.pipeline.checkpoints import CheckpointStore
from worker.pipeline.full_finetune import is_full_finetune, plan_static_memory
from worker.pipeline.labels import TokenizedExample
from worker.pipeline.memory_plan import checkpoint_if_short_of_memory
from worker.pipeline.model import loaded_dtype
from worker.pipeline.report import JobReporter
from worker.pipeline.token_store import TokenStore, as_token_store
from worker.pipeline.trainer import TrainStats, TuneryTrainer, run_trainer
from worker.pipeline.training_args import planned_warmup, training_arguments
from worker.pipeline.wandb_reporting import WandbTimeouts


def train(
    model: Any,
    tokenizer: Any,
    train_set: TokenStore | Sequence[TokenizedExample],
    eval_set: TokenStore | Sequence[TokenizedExample],
    config: TrainingConfig,
    *,
    output_dir: Path,
    reporter: JobReporter,
    checkpoints: CheckpointStore | None = None,
    resume_from: Path | None = None,
    logging: LoggingConfig | None = None,
    memory_limit_bytes: float | None = None,
    memory_rung: Rung | None = None,
    wandb_timeouts: WandbTimeouts,
    collective_timeout_s: int = 1800,
    packing: bool | None = None,
    extra_callbacks: Sequence[TrainerCallback] = (),
) -> TrainStats:
    """Train the adapter in place; raises `TrainingStopped` if the reporter asks to stop.

    With a validation set, the adapter left in `model` is the one with the best eval_loss.
    With `logging.use_wandb`, the run is also reported to Weights & Biases.

    With `checkpoints`, a checkpoint goes to storage every `checkpoints.every_steps` steps;
    `resume_from` is a downloaded checkpoint to continue from, as if never interrupted.

    Gradient checkpointing turns on by itself when the largest batch would not fit in the
    device's free memory, at most `memory_limit_bytes` (`memory_plan`).

    `packing` is the request's `data_config.packing` (`batching.choose_layout`).

    `memory_rung` (`worker.memory_ladder`) trains each of the request's micro-batches in
    `memory_rung.slices` slices, one forward and backward each, into the same optimizer step:
    the batches, their order and the steps stay the request's, so a run resumed on a lower
    rung trains exactly the steps an uninterrupted one would. Padding-free batches (one row
    of all examples) cannot be sliced: there the Trainer batches the rung's micro-batch, in
    its random order, which cuts the same examples into each optimizer step.

    `extra_callbacks` run after the `TrainingWatch` ones (`sample_answers`).
    """
    layout = choose_layout(model, group_by_length=config.group_by_length, packing=packing)
    slices = 1
    if memory_rung is not None and memory_rung.slices > 1:
        if layout == "padding_free":
            config = memory_rung.applied_to(config)
        else:
            slices = memory_rung.slices
        reporter.log(f"memory ladder: {memory_rung.describe()}")
    batch_size = micro_batch_size(config.micro_batch_size)
    # Lists of examples (tests, benchmarks) become stores too: one way to read lengths.
    train_set, eval_set = as_token_store(train_set), as_token_store(eval_set)
    has_validation = bool(len(eval_set))
    full = is_full_finetune(model)
    # A full fine-tune's weights, gradients and optimizer state come before activations.
    static = (plan_static_memory(model, limit_bytes=memory_limit_bytes, log=reporter.log)
              if full else None)
    overrides: dict[str, Any] = {"optim": static.optimizer} if static else {}
    args: TrainingArguments = training_arguments(
        config,
        output_dir=output_dir,
        has_validation=has_validation,
        quantized=bool(getattr(model, "is_loaded_in_4bit", False)),
        dtype=loaded_dtype(model),
        save_steps=checkpoints.every_steps if checkpoints else 0,
        resuming=resume_from is not None,
        # Every layout below makes ceil(examples / batch_size) batches an epoch.
        warmup_steps=planned_warmup(config, train_examples=len(train_set), reporter=reporter),
        wandb_run_name=logging.wandb_run_name if logging and logging.use_wandb else None,
        collective_timeout_s=collective_timeout_s,
        **overrides,
    )

    # Layout and batches: which examples share a batch, and how (`batching`).
    collator: Any = PadToLongest(tokenizer.pad_token_id)
    train_batches = None
    lengths = train_set.lengths.tolist()
    longest = max(lengths)
    # A random batch of the longest example: the worst a fixed-size or padding-free batch gets.
    batch_shapes = [(min(batch_size, len(train_set)), longest)]
    if layout == "padding_free":
        collator = flattening_collator()
        reporter.log(f"batches: {batch_size} examples in one row each, without padding")
    elif layout == "length_buckets":
        train_batches = LengthBucketBatches(
            lengths, batch_size=batch_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )
        reporter.log(
            f"batches: length-bucketed, up to {train_batches.token_budget} tokens (rows x "
            f"longest row), {len(train_batches)} per epoch, "
            f"{100 * train_batches.padding_share():.1f}% padding"
        )
        batch_shapes = train_batches.shapes()

    # Memory plan: gradient checkpointing only if the largest batch would not fit.
    batch_shapes = [(-(-rows // slices), longest) for rows, longest in batch_shapes]
    checkpoint_if_short_of_memory(
        model, batch_shapes,
        limit_bytes=static.activation_limit_bytes if static else memory_limit_bytes,
        log=reporter.log,
    )

    # Trainer and run.
    watch = TrainingWatch(
        reporter, config, has_validation=has_validation, checkpoints=checkpoints,
        resume_from=resume_from, keep_best_weights=not full,
    )
    trainer = TuneryTrainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(train_set),
        eval_dataset=ExampleDataset(eval_set) if has_validation else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[*watch.callbacks, *extra_callbacks],
        train_batches=train_batches,
        batch_slices=slices,
    )
    return run_trainer(
        trainer, watch, config, output_dir=output_dir, resume_from=resume_from, logging=logging,
        wandb_timeouts=wandb_timeouts,
    )
