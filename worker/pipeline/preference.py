"""Preference optimization with TRL: ORPO or DPO on prompt / chosen / rejected rows
(`examples.preference_rows`).

ORPO (Hong et al., 2024) adds to the supervised loss on the chosen answer a term that raises
the odds of the chosen answer over the rejected one; it needs no reference model, so the LoRA
model from `load_model` trains as it is. TRL 1.x keeps its `ORPOTrainer` under
`trl.experimental.orpo`.

DPO (Rafailov et al., 2023) raises the chosen answer's log-probability ratio to a reference
model above the rejected one's. The reference is the base model itself, the adapter disabled:
no second copy of the model. TRL's `DPOTrainer`, given a `PeftModel` and no `ref_model`, adds
a frozen copy of the adapter as a "ref" adapter (peft >= 0.20) and computes the reference with
it, and with the adapter disabled only when no "ref" adapter exists. `_reference_is_the_base`
deletes that copy. Equal for a fresh LoRA (its B matrices are zero), the two differ for a job
that continues an earlier job's adapter (`resume_checkpoint_path`): an attempt that resumes
from a checkpoint builds its trainer on a fresh LoRA, so a copy would make its reference
differ from the first attempt's; the base is the same for every attempt.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.dataset_columns import is_preference
from shared.schema import LoggingConfig, TrainingConfig
from shared.training_plan import DEFAULT_BETA, micro_batch_size
from worker.memory_ladder import Rung
from worker.pipeline.callbacks import TrainingWatch
from worker.pipeline.checkpoints import CheckpointStore
from worker.pipeline.errors import PipelineError
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
# DPO's rewards are beta x the log-probability ratios to the reference: the chosen answers'
# should rise above the rejected ones', the margin between them grow.
DPO_METRICS = {
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
}
# The adapter TRL's DPOTrainer adds as a frozen copy of the trained one.
TRL_REFERENCE_ADAPTER = "ref"


def train_preference(
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
    memory_rung: Rung | None = None,
    wandb_timeouts: WandbTimeouts,
    collective_timeout_s: int = 1800,
) -> TrainStats:
    """Train the adapter of `model` in place with `config.preference_optimization` (ORPO or
    DPO), as `train()` does with the supervised loss: same training_config mapping, metrics,
    log lines, cancel, early stopping on eval_loss (here the ORPO or DPO loss), checkpoints,
    and gradient checkpointing when memory is short. `max_length` caps prompt + answer in
    tokens.

    `memory_rung` (`worker.memory_ladder`) replaces the request's micro-batch and
    accumulation by its own: the Trainer's random order cuts the same examples into each
    optimizer step whatever the micro-batch, so a run resumed on a lower rung trains the
    steps an uninterrupted one would.

    Raises `TrainingStopped` if the reporter asks to stop.
    """
    from datasets import Dataset

    if memory_rung is not None:
        config = memory_rung.applied_to(config)
    method = config.preference_optimization
    if not is_preference(method):
        raise ValueError(f"not a preference method: {method}")
    beta = DEFAULT_BETA if config.beta is None else config.beta
    config_class, trainer_class = _trl_classes(method)
    overrides: dict[str, Any] = {}
    if method == "ORPO":
        # TRL's ORPO collator hands the Trainer chosen_/rejected_input_ids, never `input_ids`:
        # the Trainer cannot count tokens (it would warn at every step), so the run reports no
        # tok/s. DPO's batches have `input_ids` and an attention mask: tok/s counts both
        # answers of every pair with their prompts.
        overrides["include_num_input_tokens_seen"] = "no"
    else:
        # The reference log-probabilities are computed with each batch, the adapter disabled:
        # precomputing them would be one more pass over the data before the first step.
        overrides.update(loss_type=["sigmoid"], precompute_ref_log_probs=False)
    if config.group_by_length:
        # The length-grouped sampler reads `input_ids`, which preference rows do not have.
        overrides["train_sampling_strategy"] = "random"
        reporter.log(f"{method}: group_by_length is not applied")
    args = training_arguments(
        config,
        output_dir=output_dir,
        has_validation=bool(eval_rows),
        quantized=bool(getattr(model, "is_loaded_in_4bit", False)),
        dtype=loaded_dtype(model),
        save_steps=checkpoints.every_steps if checkpoints else 0,
        resuming=resume_from is not None,
        # Set below, from the pairs TRL keeps.
        warmup_steps=0,
        wandb_run_name=logging.wandb_run_name if logging and logging.use_wandb else None,
        arguments_class=config_class,
        collective_timeout_s=collective_timeout_s,
        max_length=max_length,
        beta=beta,
        # TRL turns these on by default; load_model already decided on checkpointing, and the
        # request's lora_dropout, not TRL, decides on dropout.
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
        extra_metrics=ORPO_METRICS if method == "ORPO" else DPO_METRICS,
        resume_from=resume_from,
    )
    with _base_as_loaded(model):
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(list(rows)),
            eval_dataset=Dataset.from_list(list(eval_rows)) if eval_rows else None,
            processing_class=tokenizer,
            callbacks=watch.callbacks,
        )
        if method == "DPO":
            _reference_is_the_base(model)
        kept = len(trainer.train_dataset)
        if kept < len(rows):
            _report_dropped(len(rows) - kept, kept, max_length, reporter)
        args.warmup_steps = planned_warmup(config, train_examples=kept, reporter=reporter)
        reference = ", reference: the base model (adapter disabled)" if method == "DPO" else ""
        reporter.log(f"{method}: beta {args.beta}, max_length {max_length} tokens{reference}")
        return run_trainer(
            trainer, watch, config, output_dir=output_dir, resume_from=resume_from,
            logging=logging, wandb_timeouts=wandb_timeouts,
        )


def _trl_classes(method: str) -> tuple[Any, Any]:
    """TRL's arguments class and trainer for `method`."""
    if method == "DPO":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    with warnings.catch_warnings():
        # pyproject pins the TRL versions whose experimental ORPO this module was tested with.
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer


def _reference_is_the_base(model: Any) -> None:
    """Delete the adapter copy TRL's DPOTrainer adds as its reference, so that it computes the
    reference with the adapter disabled (see the module's docstring)."""
    if TRL_REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(TRL_REFERENCE_ADAPTER)


def _report_dropped(dropped: int, kept: int, max_length: int, reporter: JobReporter) -> None:
    """TRL's DPO drops pairs whose prompt alone fills max_length: nothing of their answers
    would be left to compare."""
    if not kept:
        raise PipelineError(
            f"no preference pair has a prompt shorter than cutoff_len {max_length} tokens; "
            "raise cutoff_len or shorten the prompts"
        )
    reporter.warn(
        f"{dropped} preference pairs left out: their prompt alone fills cutoff_len "
        f"{max_length} tokens, so no token of their answers would be compared"
    )


@contextmanager
def _base_as_loaded(model: Any) -> Iterator[None]:
    """Undo what TRL's trainers change on the base model beyond the adapter, when the run
    ends in any way: DPOTrainer replaces the base's `forward` by one with a fused LM head
    (an instance attribute; the class's forward is the loaded one) and writes the tokenizer's
    pad id into its configs. The base goes back to the worker's cache (`base_cache`), which
    keeps it only if it is as loaded."""
    base = model.get_base_model()
    patched_before = "forward" in vars(base)
    configs = [c for c in (base.config.get_text_config(),
                           getattr(base, "generation_config", None)) if c is not None]
    pad_ids = [getattr(c, "pad_token_id", None) for c in configs]
    try:
        yield
    finally:
        if not patched_before:
            vars(base).pop("forward", None)
        for config, pad_id in zip(configs, pad_ids, strict=True):
            config.pad_token_id = pad_id
