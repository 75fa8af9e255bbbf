"""Preference optimization: ORPO on `prompt` / `chosen` / `rejected` rows, with TRL.

ORPO (Hong et al., 2024) adds to the supervised loss on the chosen answer a term that raises
the odds of the chosen answer over the rejected one; it needs no reference model, so the LoRA
model from `load_model` trains as it is. TRL 1.x keeps its `ORPOTrainer` under
`trl.experimental.orpo`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.schema import LoggingConfig, TrainingConfig
from shared.training_plan import micro_batch_size
from worker.pipeline.callbacks import TrainingWatch
from worker.pipeline.checkpoints import CheckpointStore
from worker.pipeline.examples import PreferenceRow
from worker.pipeline.memory_plan import checkpoint_if_short_of_memory
from worker.pipeline.model import loaded_dtype
from worker.pipeline.report import JobReporter
from worker.pipeline.trainer import TrainStats, run_trainer
from worker.pipeline.training_args import planned_warmup, training_arguments
from worker.pipeline.wandb_reporting import WandbTimeouts

# TRL's log keys, and the metric names they are recorded under. The log-odds ratio and the
# reward margin grow as the model learns to prefer the chosen answers; nll_loss is the
# supervised part of the loss.
ORPO_METRICS = {
    "nll_loss": "nll_loss",
    "log_odds_ratio": "log_odds_ratio",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
}


def train_orpo(
    model: Any,
    tokenizer: Any,
    rows: Sequence[PreferenceRow],
    eval_rows: Sequence[PreferenceRow],
    config: TrainingConfig,
    *,
    output_dir: Path,
    reporter: JobReporter,
    max_length: int,
    checkpoints: CheckpointStore | None = None,
    resume_from: Path | None = None,
    logging: LoggingConfig | None = None,
    memory_limit_bytes: float | None = None,
    wandb_timeouts: WandbTimeouts,
) -> TrainStats:
    """Train the adapter of `model` in place with ORPO, as `train()` does with the supervised
    loss: same training_config mapping, metrics, log lines, cancel, early stopping on eval_loss
    (here the ORPO loss), checkpoints, and gradient checkpointing when memory is short.
    `max_length` caps prompt + answer in tokens.

    Raises `TrainingStopped` if the reporter asks to stop.
    """
    from datasets import Dataset

    with warnings.catch_warnings():
        # pyproject pins the TRL versions whose experimental ORPO this module was tested with.
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    overrides: dict[str, Any] = {
        # TRL's collator hands the Trainer chosen_/rejected_input_ids, never `input_ids`: the
        # Trainer cannot count tokens (it would warn at every step), so the run reports no
        # tok/s.
        "include_num_input_tokens_seen": "no",
    }
    if config.group_by_length:
        # The length-grouped sampler reads `input_ids`, which ORPO rows do not have.
        overrides["train_sampling_strategy"] = "random"
        reporter.log("ORPO: group_by_length is not applied")
    args = training_arguments(
        config,
        output_dir=output_dir,
        has_validation=bool(eval_rows),
        quantized=bool(getattr(model, "is_loaded_in_4bit", False)),
        dtype=loaded_dtype(model),
        save_steps=checkpoints.every_steps if checkpoints else 0,
        resuming=resume_from is not None,
        # TRL truncates long rows, drops none: every row is a training example.
        warmup_steps=planned_warmup(config, train_examples=len(rows), reporter=reporter),
        wandb_run_name=logging.wandb_run_name if logging and logging.use_wandb else None,
        arguments_class=ORPOConfig,
        max_length=max_length,
        # ORPOConfig turns these on by default; load_model already decided on checkpointing,
        # and the request's lora_dropout, not TRL, decides on dropout.
        gradient_checkpointing=False,
        disable_dropout=False,
        **overrides,
    )
    # A batch holds every example's chosen and rejected answer, each up to max_length.
    batch_size = micro_batch_size(config.micro_batch_size)
    checkpoint_if_short_of_memory(model, [(2 * batch_size, max_length)],
                                  limit_bytes=memory_limit_bytes, log=reporter.log)
    watch = TrainingWatch(
        reporter,
        config,
        has_validation=bool(eval_rows),
        checkpoints=checkpoints,
        extra_metrics=ORPO_METRICS,
        resume_from=resume_from,
    )
    trainer = ORPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(list(rows)),
        eval_dataset=Dataset.from_list(list(eval_rows)) if eval_rows else None,
        processing_class=tokenizer,
        callbacks=watch.callbacks,
    )
    reporter.log(f"ORPO: beta {args.beta}, max_length {max_length} tokens")
    return run_trainer(
        trainer, watch, config, output_dir=output_dir, resume_from=resume_from, logging=logging,
        wandb_timeouts=wandb_timeouts,
    )
