"""A base model's state as loaded, and putting a base back into it after a job trained on it.

A job changes its base model in place: peft puts LoRA layers into it, gradient checkpointing
sets flags on its layers and registers an input hook, `use_cache` goes off, the Trainer
switches it to train mode, bitsandbytes records the compute dtype on the first forward, and
the parameters' `requires_grad` are flipped. `snapshot_base` records, right after loading,
everything of that kind; `restore_base` undoes what a job is known to change and then compares
the rest. Whatever still differs is returned: the caller must not reuse such a base.

What is compared, module by module: the module objects themselves (LoRA layers removed means
the very objects loaded are back), the plain attributes (flags, numbers, names, dtypes), the
set of instance attributes, the hooks, and each parameter and buffer: the same tensor object,
storage, dtype and device, and the same version counter, which every in-place write bumps. An
untouched version proves the weights were never written, without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.pipeline.lora_init import BASE_REWRITTEN_MARK

# Plain attributes a job changes and that mean nothing beyond themselves: put back as loaded.
# `compute_type_is_set` / `compute_dtype`: bitsandbytes' Linear4bit picks its compute dtype at
# its first forward; reset, the next job's first forward picks it again, as on a fresh load.
# `support_avx512bf16_for_cpu` is off from `keep_4bit_weights_trainable`; a repack it allowed
# would show in the weight's quant state and storage, which are compared.
RESTORED_ATTRIBUTES = frozenset(
    {
        "training",
        "gradient_checkpointing",
        "compute_type_is_set",
        "compute_dtype",
        "support_avx512bf16_for_cpu",
    }
)
# Instance attributes a job adds that are only bookkeeping of what it turned on (the LoRA
# config peft copies onto the model, transformers' input-grad hooks and checkpoint function,
# the tags TRL adds for model cards, the alpha the Trainer's NEFTune hook reads, left behind
# when training ends in an exception): removed once the hooks and flags they describe are gone.
ADDED_BY_JOBS = frozenset(
    {
        "peft_config",
        "neftune_noise_alpha",
        "_require_grads_hooks",
        "_require_grads_hook",
        "_gradient_checkpointing_func",
        "model_tags",
    }
)
# Config values a job changes: gradient checkpointing turns the KV cache off.
RESTORED_CONFIG = ("use_cache",)
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


@dataclass(frozen=True)
class TensorState:
    tensor_id: int
    data_ptr: int
    version: int
    requires_grad: bool
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]
    # bitsandbytes 4-bit weights: their quantization state and whether it was repacked for
    # the CPU inference kernel (which breaks gradients, see keep_4bit_weights_trainable).
    quant_state_id: int | None
    packed_for_cpu: bool


@dataclass(frozen=True)
class ModuleState:
    module_id: int
    attribute_names: frozenset[str]
    plain: dict[str, Any]
    hooks: dict[str, frozenset[int]]


@dataclass(frozen=True)
class BaseSnapshot:
    """What `restore_base` returns a base model to; ids only, no tensors are held."""

    modules: dict[str, ModuleState]
    tensors: dict[str, TensorState]
    config: dict[str, Any]
    generation_config: dict[str, Any] | None


def snapshot_base(model: torch.nn.Module) -> BaseSnapshot:
    """Record `model`'s state; call it right after loading, before any job touches it."""
    return BaseSnapshot(
        modules={
            name: _module_state(module)
            for name, module in model.named_modules(remove_duplicate=False)
        },
        tensors=_tensor_states(model),
        config=_config_dict(model),
        generation_config=_generation_config_dict(model),
    )


def restore_base(model: torch.nn.Module, snapshot: BaseSnapshot) -> list[str]:
    """Put `model` back as `snapshot` saw it after loading; returns what still differs.

    Removes LoRA layers without merging, hooks registered since loading, the attributes in
    `ADDED_BY_JOBS`; restores `RESTORED_ATTRIBUTES`, `RESTORED_CONFIG`, each parameter's
    `requires_grad`, and drops gradients. An empty list means the base is as loaded.
    """
    remove_lora_layers(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, module in modules.items():
        loaded = snapshot.modules.get(name)
        if loaded is not None and loaded.module_id == id(module):
            _restore_module(module, loaded)
    config = getattr(model, "config", None)
    for key in RESTORED_CONFIG:
        if config is not None and key in snapshot.config:
            setattr(config, key, snapshot.config[key])
    for name, tensor in model.named_parameters(remove_duplicate=False):
        loaded_tensor = snapshot.tensors.get(f"parameter {name}")
        if loaded_tensor is not None:
            tensor.requires_grad_(loaded_tensor.requires_grad)
        tensor.grad = None
    return base_differences(model, snapshot)


def base_differences(model: torch.nn.Module, snapshot: BaseSnapshot) -> list[str]:
    """How `model` differs from `snapshot`, one line each; empty when it is as loaded."""
    found: list[str] = []
    if getattr(model, BASE_REWRITTEN_MARK, False):
        # In-place writes through `.data` (OLoRA's) bump no version counter: only the mark
        # tells.
        found.append("weights rewritten by the LoRA initialization (PiSSA/OLoRA)")
    modules = dict(model.named_modules(remove_duplicate=False))
    if modules.keys() != snapshot.modules.keys():
        added = sorted(modules.keys() - snapshot.modules.keys())
        missing = sorted(snapshot.modules.keys() - modules.keys())
        found.append(f"modules added {added[:3]}, missing {missing[:3]}")
    for name in modules.keys() & snapshot.modules.keys():
        found += [f"{name or 'model'}: {d}" for d in _module_differences(
            modules[name], snapshot.modules[name])]
    tensors = _tensor_states(model)
    if tensors.keys() != snapshot.tensors.keys():
        found.append(f"tensors added {sorted(tensors.keys() - snapshot.tensors.keys())[:3]}, "
                     f"missing {sorted(snapshot.tensors.keys() - tensors.keys())[:3]}")
    for name in tensors.keys() & snapshot.tensors.keys():
        if tensors[name] != snapshot.tensors[name]:
            found.append(f"{name}: {_tensor_change(snapshot.tensors[name], tensors[name])}")
    for key, (before, after) in _dict_changes(snapshot.config, _config_dict(model)).items():
        found.append(f"config.{key}: {before!r} -> {after!r}")
    generation = _generation_config_dict(model)
    if generation != snapshot.generation_config:
        found.append("generation_config changed")
    return found


def remove_lora_layers(model: torch.nn.Module) -> int:
    """Replace every peft tuner layer by the base layer it wraps, merging nothing; returns how
    many were replaced. What peft's `unload()` does, but from the base model alone, so it also
    works when the job never got a `PeftModel` back (it failed while wrapping)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    outermost: list[str] = []
    for name, module in model.named_modules():
        inside_another = any(name.startswith(outer + ".") for outer in outermost)
        if isinstance(module, BaseTunerLayer) and not inside_another:
            outermost.append(name)
    for name in outermost:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        tuner = getattr(parent, child)
        setattr(parent, child, tuner.get_base_layer())
    return len(outermost)


def _module_state(module: torch.nn.Module) -> ModuleState:
    return ModuleState(
        module_id=id(module),
        attribute_names=frozenset(vars(module)),
        plain={key: value for key, value in vars(module).items() if _is_plain(value)},
        hooks={name: frozenset(getattr(module, name, {})) for name in HOOK_DICTS},
    )


def _restore_module(module: torch.nn.Module, loaded: ModuleState) -> None:
    for name, loaded_keys in loaded.hooks.items():
        hooks = getattr(module, name, None)
        if hooks is None:
            continue
        for key in [k for k in hooks if k not in loaded_keys]:
            del hooks[key]
    # An attribute the class defines becomes an instance attribute once set (transformers'
    # decoder layers carry `gradient_checkpointing = False` on the class): deleting it restores
    # the class's value, as loaded.
    for key in (ADDED_BY_JOBS | RESTORED_ATTRIBUTES) & (set(vars(module)) - loaded.attribute_names):
        delattr(module, key)
    for key in RESTORED_ATTRIBUTES & loaded.plain.keys():
        setattr(module, key, loaded.plain[key])


def _module_differences(module: torch.nn.Module, loaded: ModuleState) -> list[str]:
    if id(module) != loaded.module_id:
        return [f"another {type(module).__name__} object than the one loaded"]
    now = _module_state(module)
    found = []
    added = sorted(now.attribute_names - loaded.attribute_names)
    missing = sorted(loaded.attribute_names - now.attribute_names)
    if added or missing:
        found.append(f"attributes added {added}, missing {missing}")
    for key, (before, after) in _dict_changes(loaded.plain, now.plain).items():
        found.append(f"{key}: {before!r} -> {after!r}")
    for name, keys in now.hooks.items():
        if keys != loaded.hooks[name]:
            found.append(f"{name} differ")
    return found


def _tensor_states(model: torch.nn.Module) -> dict[str, TensorState]:
    states = {
        f"parameter {name}": _tensor_state(p)
        for name, p in model.named_parameters(remove_duplicate=False)
    }
    states.update(
        {
            f"buffer {name}": _tensor_state(b)
            for name, b in model.named_buffers(remove_duplicate=False)
        }
    )
    return states


def _tensor_state(tensor: torch.Tensor) -> TensorState:
    quant_state = getattr(tensor, "quant_state", None)
    return TensorState(
        tensor_id=id(tensor),
        data_ptr=tensor.data_ptr(),
        version=tensor._version,
        requires_grad=tensor.requires_grad,
        dtype=tensor.dtype,
        device=tensor.device,
        shape=tuple(tensor.shape),
        quant_state_id=None if quant_state is None else id(quant_state),
        packed_for_cpu=bool(getattr(quant_state, "packing_format_for_cpu", False)),
    )


def _tensor_change(before: TensorState, after: TensorState) -> str:
    changed = [
        field
        for field in ("tensor_id", "data_ptr", "version", "requires_grad", "dtype", "device",
                      "shape", "quant_state_id", "packed_for_cpu")
        if getattr(before, field) != getattr(after, field)
    ]
    return "changed " + ", ".join(changed)


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None else {}


def _generation_config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    generation = getattr(model, "generation_config", None)
    return generation.to_dict() if generation is not None else None


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _dict_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {
        key: (before.get(key, _ABSENT), after.get(key, _ABSENT))
        for key in before.keys() | after.keys()
        if before.get(key, _ABSENT) != after.get(key, _ABSENT)
    }


def _is_plain(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(isinstance(item, _PLAIN) for item in value)
    return isinstance(value, _PLAIN)
