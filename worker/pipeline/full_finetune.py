"""Full fine-tuning (`pretrainedmodel_config.use_lora` false): every weight of the base trains.

The weights are fp32 master weights (`model.base_model_options` loads them so), whatever the
device computes in: an update smaller than a bf16 weight's rounding step would otherwise be
lost. The forward passes run under the Trainer's autocast in the dtype a LoRA job on the same
device would load its base in (`model.compute_dtype`): bf16 on a bf16 GPU or CPU, fp32 where
bf16 is emulated.

Memory is planned before the first step (`plan_static_memory`): besides activations, a full
fine-tune holds per parameter its fp32 weight, its fp32 gradient and AdamW's two fp32 moments,
16 bytes. When that does not fit, bitsandbytes' 8-bit AdamW keeps the moments in 2 bytes (10
in all); when that does not fit either, the job fails saying how much it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shared.schema import PretrainedModelConfig
from worker.pipeline.errors import PipelineError
from worker.pipeline.memory_plan import USABLE_SHARE, available_memory_bytes
from worker.pipeline.model import COMPUTE_DTYPE_ATTRIBUTE, enable_gradient_checkpointing
from worker.pipeline.report import JobReporter, LogFn

# The fields a full fine-tune does not read: they shape a LoRA adapter.
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_bias", "lora_target_modules",
               "use_dora", "use_rslora", "lora_init")
WEIGHT_BYTES = 4
GRADIENT_BYTES = 4
ADAMW_MOMENT_BYTES = 8
ADAMW_8BIT_MOMENT_BYTES = 2


def is_full_finetune(model: Any) -> bool:
    """Whether `model` is trained whole: a plain transformers model, no peft wrapper."""
    return not hasattr(model, "peft_config")


def prepare_full_finetune(
    model: Any, config: PretrainedModelConfig, *, compute: torch.dtype, reporter: JobReporter,
) -> Any:
    """Make every parameter of the fp32 base `model` trainable and record that its forward
    passes compute in `compute`; returns `model`. A request that set a LoRA field gets a job
    warning that it is unused."""
    unused = [name for name in LORA_FIELDS if name in config.model_fields_set]
    if unused:
        reporter.warn(f"pretrainedmodel_config {', '.join(unused)}: unused, use_lora is false "
                      "(full fine-tuning trains every weight, no adapter)")
    weights = {p.dtype for p in model.parameters()}
    if weights != {torch.float32}:
        raise PipelineError(f"full fine-tuning needs fp32 weights; the base has {weights}")
    if config.use_gradient_checkpointing:
        enable_gradient_checkpointing(model)
        reporter.log("gradient checkpointing on")
    for param in model.parameters():
        param.requires_grad_(True)
    setattr(model, COMPUTE_DTYPE_ATTRIBUTE, compute)
    precision = ("fp32" if compute == torch.float32
                 else f"{str(compute).removeprefix('torch.')} autocast")
    total = sum(p.numel() for p in model.parameters())
    reporter.log(f"full fine-tuning: all {total:,} parameters trainable, fp32 master weights, "
                 f"forward and backward in {precision}")
    return model


@dataclass(frozen=True)
class StaticMemoryPlan:
    """What a full fine-tune keeps besides activations, and the optimizer that makes it fit."""

    optimizer: str
    """transformers' `optim` name."""
    static_bytes: float
    """Weights, gradients and optimizer state."""
    available_bytes: float
    """What the model's device can hold in all: free memory plus the loaded weights, at most
    the worker's training memory limit."""

    @property
    def activation_limit_bytes(self) -> float:
        """What is left for activations (`memory_plan.checkpoint_if_short_of_memory`)."""
        return max(0.0, self.available_bytes - self.static_bytes)


def static_bytes(parameters: int, *, eight_bit: bool) -> float:
    moments = ADAMW_8BIT_MOMENT_BYTES if eight_bit else ADAMW_MOMENT_BYTES
    return float(parameters * (WEIGHT_BYTES + GRADIENT_BYTES + moments))


def plan_static_memory(model: Any, *, limit_bytes: float | None, log: LogFn) -> StaticMemoryPlan:
    """Torch's AdamW when weights, gradients and its fp32 moments fit in `USABLE_SHARE` of the
    memory (leaving the rest to activations), else bitsandbytes' 8-bit AdamW (paged on
    CUDA); `PipelineError` with the memory needed and available when neither fits."""
    parameters = sum(p.numel() for p in model.parameters())
    weights = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    # The weights are loaded already, so the device's free memory no longer counts them.
    free = available_memory_bytes(model) + weights
    available = free if limit_bytes is None else min(free, limit_bytes)
    usable = USABLE_SHARE * available
    gib = 2**30
    full, eight_bit = static_bytes(parameters, eight_bit=False), static_bytes(parameters,
                                                                               eight_bit=True)
    if full <= usable:
        log(f"memory: {full / gib:.2f} GiB for fp32 weights, gradients and AdamW moments of "
            f"{parameters:,} parameters, {available / gib:.2f} GiB available")
        return StaticMemoryPlan("adamw_torch_fused", full, available)
    if eight_bit <= usable:
        cuda = model.get_input_embeddings().weight.device.type == "cuda"
        optimizer = "paged_adamw_8bit" if cuda else "adamw_8bit"
        log(f"memory: fp32 AdamW would need {full / gib:.2f} GiB for weights, gradients and "
            f"moments, {available / gib:.2f} GiB available: 8-bit AdamW ({optimizer}, "
            f"bitsandbytes) instead, {eight_bit / gib:.2f} GiB")
        return StaticMemoryPlan(optimizer, eight_bit, available)
    raise PipelineError(
        f"full fine-tuning of {parameters:,} parameters needs {eight_bit / gib:.2f} GiB for "
        f"fp32 weights, gradients and 8-bit AdamW moments ({full / gib:.2f} GiB with fp32 "
        f"moments), plus activations; {available / gib:.2f} GiB available on this worker. "
        "Use use_lora true (LoRA trains a small adapter on the frozen base), or a smaller model"
    )
