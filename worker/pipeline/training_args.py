"""The request's training_config as transformers' TrainingArguments, for every trainer, and
the warm-up the run really gets (`planned_warmup`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import TrainingArguments

from shared.schema import TrainingConfig
from shared.training_plan import (
    EVAL_EVERY_FRACTION,
    SCHEDULERS_WITHOUT_WARMUP,
    job_seed,
    micro_batch_size,
    optimizer_steps,
    warmup_plan,
)
from worker.pipeline.ranks import in_process_group
from worker.pipeline.report import JobReporter

# torch's ReduceLROnPlateau waits 10 evaluations by default, which never happens in ten.
PLATEAU_KWARGS = {"patience": 1, "factor": 0.5}

Arguments = TypeVar("Arguments", bound=TrainingArguments)


def planned_warmup(config: TrainingConfig, *, train_examples: int, reporter: JobReporter) -> int:
    """The warm-up steps to give the Trainer for a run over `train_examples` examples (those
    left after tokenization and the validation split): `shared.training_plan`'s rule on the
    optimizer steps the Trainer will run, said in the log, and a job warning when the rule cut
    the warm-up or it takes a large share of the run.

    transformers' warm-up runs step s, counted from 0, at learning_rate * s / warm-up: the
    first step of any warm-up runs at 0 (AdamW still takes its gradient into its moments),
    and step warm-up + 1 is the first at learning_rate. A run too short for a tenth of it to
    make a step gets no warm-up, hence no step at 0.
    """
    if config.lr_scheduler_type in SCHEDULERS_WITHOUT_WARMUP:
        return config.warmup_steps
    total = optimizer_steps(
        train_examples, epochs=config.num_train_epochs,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        batch_size=micro_batch_size(config.micro_batch_size), devices=config.devices,
    )
    plan = warmup_plan(config.warmup_steps, total)
    if plan.warning:
        reporter.warn(plan.warning)
    rate = f"learning_rate {config.learning_rate:.1e}"
    if plan.steps:
        reporter.log(
            f"warm-up: {plan.steps} of {total} steps; the learning rate rises from 0 at step 1 "
            f"to {rate} at step {plan.steps + 1}"
        )
    else:
        reporter.log(f"warm-up: none; training starts at {rate} (step 1 of {total})")
    return plan.steps


def training_arguments(
    config: TrainingConfig,
    *,
    output_dir: Path,
    has_validation: bool,
    quantized: bool,
    dtype: torch.dtype = torch.float32,
    save_steps: int = 0,
    resuming: bool = False,
    warmup_steps: int | None = None,
    wandb_run_name: str | None = None,
    collective_timeout_s: int = 1800,
    arguments_class: type[Arguments] = TrainingArguments,  # type: ignore[assignment]
    **overrides: Any,
) -> Arguments:
    """Map the request's training_config onto transformers 5 TrainingArguments.

    `dtype` is the one the base model was loaded in (`model.loaded_dtype`): half precision
    trains under autocast. Micro-batches hold `training_config.micro_batch_size` examples
    (`training_plan.micro_batch_size`), in training and evaluation. `save_steps` > 0 saves a
    checkpoint that often. `resuming`: the run continues an interrupted one from its
    checkpoint. A run that trains passes its `planned_warmup` as `warmup_steps`; None keeps
    the request's (arguments that only evaluate). A trainer with its own arguments class
    (TRL's `ORPOConfig`, `DPOConfig`) passes it as `arguments_class`, with its own
    fields and any value it must change in `overrides`. In a process group, a rank waits
    `collective_timeout_s` for the others in a collective before the group fails.
    """
    cuda = torch.cuda.is_available()
    batch_size = micro_batch_size(config.micro_batch_size)
    scheduler_kwargs = PLATEAU_KWARGS if config.lr_scheduler_type == "reduce_lr_on_plateau" else {}
    evaluation: dict[str, Any] = {"eval_strategy": "no"}
    if has_validation:
        evaluation = {
            "eval_strategy": "steps",
            "eval_steps": EVAL_EVERY_FRACTION,
            # The base model's validation loss: the baseline every later eval_loss is read against.
            # Not again on resuming: an evaluation where the run resumes is one the uninterrupted
            # run never made, yet early stopping would count it and the best adapter consider it.
            "eval_on_start": not resuming,
            "per_device_eval_batch_size": batch_size,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
    # Storage keeps the checkpoints a later attempt resumes from; one local copy is enough.
    saving: dict[str, Any] = {"save_strategy": "no"}
    if save_steps > 0:
        saving = {"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 1}
    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        num_train_epochs=config.num_train_epochs,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_steps if warmup_steps is None else warmup_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs,
        # The supervised recipe replaces the Trainer's length-grouped sampler by
        # `LengthBucketBatches`, also when the request leaves group_by_length out; TRL's
        # trainers use this as is.
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
        # The Trainer seeds torch (dropout) with `seed`, its samplers and `batching`'s length
        # buckets with `data_seed`: one job seed for both.
        seed=job_seed(config.seed),
        data_seed=job_seed(config.seed),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # Every LoRA weight takes part in every forward pass: DDP need not look for unused
        # ones after each backward (which costs a pass over the autograd graph).
        ddp_find_unused_parameters=False,
        ddp_timeout=collective_timeout_s,
        disable_tqdm=True,
        # The Trainer hooks the noise onto the input embeddings' forward, which the labelled
        # loss (`trainer.TuneryTrainer`) calls through the decoder too; only in train mode.
        neftune_noise_alpha=config.neftune_noise_alpha,
        **evaluation,
        **saving,
    )
    if config.strategy == "fsdp" and in_process_group():
        # PyTorch FSDP2 through accelerate: each decoder layer's weights, gradients and
        # optimizer state sharded over the ranks; whole tensors (the adapter) in checkpoints.
        values.update(fsdp=True, fsdp_config={"version": 2,
                                              "state_dict_type": "FULL_STATE_DICT"})
    return arguments_class(**{**values, **overrides})


def optimizer_name(*, quantized: bool, cuda: bool) -> str:
    """LoRA: torch's fused AdamW, one kernel for all the adapter's tensors (on CPU the default
    AdamW loops over them one by one). QLoRA keeps AdamW's two moments in 8 bit
    (bitsandbytes), paged on CUDA.

    bitsandbytes runs 8-bit AdamW on CPU too (same losses as torch's AdamW to 1e-3 on the tiny
    model), but has no paging there: `paged_adamw_8bit` on CPU warns "Paged optimizers are not
    supported on CPU" and behaves as `adamw_8bit`, so CPU asks for that directly.
    """
    if not quantized:
        return "adamw_torch_fused"
    return "paged_adamw_8bit" if cuda else "adamw_8bit"
