"""Device classes: the kinds of worker a deployment runs, and which one a job goes to.

An operator lists the classes in `TUNERY_DEVICE_CLASSES` (`DeviceClass`: a name, the devices
each worker of the class owns, the memory of each device). A class's name is its Celery
queue: the Redis list its workers consume and an autoscaler (KEDA) watches. At submit, the
API routes the job to one class (`route`) and stores it with the job; the wake-up goes to
that class's queue, and only that class's workers claim the job.

The rule, at submit:

1. The class has at least as many devices as `training_config.devices`.
2. Where the model's size is known, the memory one device needs is at most the class's
   `memory_gb` (a class that states none fits any model). The size is the parameter count:
   from the bytes of a local folder's `*.safetensors` files, read as 16-bit weights
   (`size_of_weights_folder`; a float32 checkpoint is over-counted, never under-counted), or
   from a hub id's name (`parameters_from_name`: `Mistral-7B` 7e9, `SmolLM2-135M` 1.35e8,
   `Mixtral-8x7B` 56e9). A size that is unknown is not checked.
3. Among the classes that fit, the smallest: fewest devices, then least memory (a class that
   states none counts as the largest), then the order of the list. So a small job never holds
   a big machine while a small one would do.

Memory per device (`memory_per_device_gb`), in GB of 2**30 bytes as TUNERY_TRAINING_MEMORY_GB:

    weights = parameters x 2 bytes (16-bit), or x 0.55 byte (4-bit NF4, use_quantization:
              half a byte per weight plus the quantization constants and the layers that stay
              16-bit, such as the embeddings)
              or, for a full fine-tune (use_lora false), x 10 bytes: its fp32 weight and
              gradient and 8-bit AdamW's two moments, the least the worker trains it with
              (`worker.pipeline.full_finetune`)
    weights / devices when strategy is 'fsdp' (sharded); each device holds them all with 'ddp'
    per device = weights x 1.25 (HEADROOM) + 2 GB (ADAPTER_ALLOWANCE_GB)

HEADROOM keeps the weights within 80% of a device, the share the worker's own memory plan
(`worker.pipeline.memory_plan`) gives a run, for the CUDA context, the allocator's
fragmentation and the dequantized copies of a 4-bit layer. The allowance holds the LoRA
adapter with its gradients and AdamW state, and activations of a modest batch; a long batch
past it is the worker's to fit (gradient checkpointing, the memory ladder), not a reason to
refuse the job here.

Worked example, classes `[{"name": "l4", "devices": 1, "memory_gb": 24},
{"name": "a100-x4", "devices": 4, "memory_gb": 80}]`:

- `Mistral-7B`, 16-bit, 1 device: 7e9 x 2 B = 13.0 GB x 1.25 + 2 = 18.3 GB; fits l4 (24 GB),
  the smallest class that fits, so it goes to l4.
- `Meta-Llama-3-70B`, 16-bit, 1 device: 130.4 GB x 1.25 + 2 = 165.0 GB; no class fits (a
  class with more devices than asked counts: a100-x4 has 80 GB): 422 on
  `pretrainedmodel_config.model_path`, suggesting use_quantization (about 46.8 GB per device,
  which a100-x4 holds) or strategy 'fsdp' with devices 4.
- The same with `devices: 4, strategy: "fsdp"`: 130.4 / 4 x 1.25 + 2 = 42.7 GB; goes to
  a100-x4.
- `devices: 8`: no class has 8 devices: 422 on `training_config.devices`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEVICES_FIELD = "training_config.devices"
MODEL_FIELD = "pretrainedmodel_config.model_path"
QUANTIZATION_FIELD = "pretrainedmodel_config.use_quantization"
STRATEGY_FIELD = "training_config.strategy"
LORA_FIELD = "pretrainedmodel_config.use_lora"

NAME_PATTERN = re.compile(r"[a-z0-9-]{1,40}")
GB = 2**30
BYTES_PER_PARAMETER_16BIT = 2.0
BYTES_PER_PARAMETER_4BIT = 0.55
BYTES_PER_PARAMETER_FULL_FINETUNE = 10.0
HEADROOM = 1.25
ADAPTER_ALLOWANCE_GB = 2.0
WEIGHTS_SUFFIX = ".safetensors"

# One part of a model's name that states its size: `7B`, `0.5B`, `135M`, or a mixture of
# experts' `8x7B`. Case-insensitive, so `llama-2-7b-hf` reads too; `k` is left out on purpose:
# `4k` in a name is a context length.
_SIZE_PART = re.compile(r"(?:(\d{1,3})x)?(\d{1,4}(?:\.\d{1,3})?)([bm])", re.IGNORECASE)
_UNIT = {"b": 1e9, "m": 1e6}


class DeviceClass(BaseModel):
    """One kind of worker: `TUNERY_DEVICE_CLASSES` holds a JSON list of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The class's name, and the name of its Celery queue (the "
                                  "Redis list its workers consume): 1 to 40 lowercase "
                                  "letters, digits or '-'.")
    devices: int = Field(ge=1, description="Devices each worker of the class owns (its "
                                           "TUNERY_WORKER_DEVICES).")
    memory_gb: float | None = Field(None, gt=0, description="Memory of each device, in GB "
                                    "(2**30 bytes). null: not stated, any model fits.")

    @field_validator("name")
    @classmethod
    def _queue_name(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"class name {name!r} must be 1 to 40 lowercase letters, digits or "
                             "'-' (it is the class's queue name)")
        return name

    def describe(self) -> str:
        """`gpu-x2 (2)`, or with its memory `gpu-x2 (2 x 80 GB)`."""
        memory = f" x {self.memory_gb:g} GB" if self.memory_gb is not None else ""
        return f"{self.name} ({self.devices}{memory})"


def default_classes(queue_name: str) -> list[DeviceClass]:
    """The classes of a deployment that lists none: one, named as its queue (the name is used
    as it is, whatever its grammar: it worked as a queue before classes existed), with one
    device of unstated memory."""
    return [DeviceClass.model_construct(name=queue_name, devices=1, memory_gb=None)]


def duplicate_names(classes: Sequence[DeviceClass]) -> list[str]:
    """Names that more than one class has, each once, in list order."""
    seen: set[str] = set()
    duplicates: list[str] = []
    for device_class in classes:
        if device_class.name in seen and device_class.name not in duplicates:
            duplicates.append(device_class.name)
        seen.add(device_class.name)
    return duplicates


def worker_class_problem(device_class: DeviceClass, worker_devices: int) -> str | None:
    """Why a worker owning `worker_devices` devices cannot serve `device_class`, or None. It
    would claim the class's jobs and have fewer devices than they were routed for."""
    if device_class.devices <= worker_devices:
        return None
    return (f"TUNERY_WORKER_DEVICE_CLASS {device_class.name!r} has {device_class.devices} "
            f"devices but this worker owns {worker_devices} (TUNERY_WORKER_DEVICES): it would "
            f"claim jobs that need {device_class.devices}; set TUNERY_WORKER_DEVICES to "
            f"{device_class.devices} on a host that has them, or serve a class with fewer")


@dataclass(frozen=True)
class ModelSize:
    parameters: float
    basis: str
    """Where the count comes from, for messages: "from its name", "from its safetensors"."""


def parameters_from_name(model_path: str) -> float | None:
    """The parameter count a hub id's name states (`Qwen/Qwen2.5-0.5B-Instruct` 5e8,
    `mistralai/Mixtral-8x7B-v0.1` 56e9), or None when it states none. The name is read part by
    part (split on '-' and '_'), so the `2.5` of `Qwen2.5` is no size; where several parts
    state one (`Qwen2.5-7B-Instruct-1M`, whose `1M` is a context length) the largest counts."""
    name = model_path.rstrip("/").rsplit("/", 1)[-1]
    counts = []
    for part in re.split(r"[-_]", name):
        matched = _SIZE_PART.fullmatch(part)
        if matched is None:
            continue
        experts, size, unit = matched.groups()
        counts.append(int(experts or 1) * float(size) * _UNIT[unit.lower()])
    return max(counts) if counts else None


def size_of_weights_folder(folder: Path) -> ModelSize | None:
    """The size of the model in `folder` from its `*.safetensors` files, read as 16-bit
    weights; None when it has none or cannot be read."""
    try:
        total = sum(entry.stat().st_size for entry in os.scandir(folder)
                    if entry.name.endswith(WEIGHTS_SUFFIX) and entry.is_file())
    except OSError:
        return None
    if not total:
        return None
    return ModelSize(total / BYTES_PER_PARAMETER_16BIT,
                     f"from its {total / GB:.1f} GB of safetensors")


def size_from_name(model_path: str) -> ModelSize | None:
    parameters = parameters_from_name(model_path)
    return None if parameters is None else ModelSize(parameters, "from its name")


@dataclass(frozen=True)
class JobNeeds:
    """What of a job the rule reads (`training_config` and `pretrainedmodel_config`)."""

    devices: int
    strategy: str
    quantized: bool
    size: ModelSize | None
    full_finetune: bool = False
    """use_lora false: every weight trains, with its gradient and optimizer state."""


def memory_per_device_gb(parameters: float, *, quantized: bool, devices: int,
                         strategy: str, full_finetune: bool = False) -> float:
    """The memory one device needs to train a LoRA adapter on a base of `parameters` (or with
    `full_finetune` the whole model), in GB (the module's docstring says how)."""
    per_parameter = BYTES_PER_PARAMETER_4BIT if quantized else BYTES_PER_PARAMETER_16BIT
    if full_finetune:
        per_parameter = BYTES_PER_PARAMETER_FULL_FINETUNE
    weights = parameters * per_parameter / GB
    if strategy == "fsdp":
        weights /= devices
    return weights * HEADROOM + ADAPTER_ALLOWANCE_GB


@dataclass(frozen=True)
class Routing:
    device_class: DeviceClass
    memory_gb: float | None
    """The memory per device the job was estimated to need; None: its size is unknown."""


class NoDeviceClass(ValueError):
    """No class fits the job; `field` is the payload field to change, `message` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def route(classes: Sequence[DeviceClass], needs: JobNeeds) -> Routing:
    """The smallest class that fits the job (module docstring); `NoDeviceClass` otherwise."""
    enough = [c for c in classes if c.devices >= needs.devices]
    if not enough:
        raise NoDeviceClass(DEVICES_FIELD, (
            f"no device class has {needs.devices} devices; classes: "
            + ", ".join(f"{c.name} ({c.devices})" for c in classes)))
    needed = None if needs.size is None else _needed(needs, needs.devices, needs.strategy,
                                                     needs.quantized)
    fitting = [c for c in enough if needed is None or c.memory_gb is None
               or needed <= c.memory_gb]
    if not fitting:
        raise NoDeviceClass(MODEL_FIELD, _too_large(classes, enough, needs, needed))
    order = {c.name: i for i, c in enumerate(classes)}
    chosen = min(fitting, key=lambda c: (
        c.devices, c.memory_gb if c.memory_gb is not None else float("inf"), order[c.name]))
    return Routing(chosen, needed)


def _needed(needs: JobNeeds, devices: int, strategy: str, quantized: bool) -> float:
    assert needs.size is not None
    return memory_per_device_gb(needs.size.parameters, quantized=quantized, devices=devices,
                                strategy=strategy, full_finetune=needs.full_finetune)


def _too_large(classes: Sequence[DeviceClass], enough: Sequence[DeviceClass], needs: JobNeeds,
               needed: float | None) -> str:
    """Why the model fits no class with enough devices, and what would make it fit."""
    assert needs.size is not None and needed is not None
    largest = max(enough, key=lambda c: c.memory_gb or 0.0)
    billions = needs.size.parameters / 1e9
    sharded = " sharded with fsdp" if needs.strategy == "fsdp" else ""
    how = ("full fine-tuning" if needs.full_finetune
           else "4-bit" if needs.quantized else "16-bit")
    message = (f"about {needed:.1f} GB per device needed ({billions:.3g}B parameters "
               f"{needs.size.basis}, {how}, on "
               f"{needs.devices} device{'s' if needs.devices > 1 else ''}{sharded}); the "
               f"largest class with {needs.devices} or more devices has "
               f"{largest.memory_gb:g} GB ({largest.name})")
    if needs.full_finetune:
        # Neither 4-bit nor fsdp combines with a full fine-tune (`shared.schema`).
        lora = memory_per_device_gb(needs.size.parameters, quantized=False,
                                    devices=needs.devices, strategy=needs.strategy)
        return message + f"; try {LORA_FIELD} true (about {lora:.1f} GB per device)"
    tips = []
    if not needs.quantized:
        # A 4-bit model is never sharded: with fsdp asked, the tip is 4-bit with ddp.
        quantized = _needed(needs, needs.devices, "ddp", True)
        with_ddp = f" with {STRATEGY_FIELD} 'ddp'" if needs.strategy == "fsdp" else ""
        tips.append(f"{QUANTIZATION_FIELD} true{with_ddp} (about {quantized:.1f} GB per "
                    "device)")
    # Sharding is what more devices buy: with ddp each device holds the whole model, and a
    # 4-bit model cannot be sharded (`shared.schema` refuses fsdp with use_quantization).
    most = max(classes, key=lambda c: c.devices)
    if not needs.quantized and most.devices > 1 and (needs.strategy != "fsdp"
                                                     or most.devices > needs.devices):
        per_shard = _needed(needs, most.devices, "fsdp", False)
        tips.append(f"{STRATEGY_FIELD} 'fsdp' with {DEVICES_FIELD} {most.devices} (about "
                    f"{per_shard:.1f} GB per device)")
    if tips:
        message += "; try " + ", or ".join(tips)
    return message
