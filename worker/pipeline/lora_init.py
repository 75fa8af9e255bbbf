"""How a job's LoRA adapter starts (`lora_init`), and the initial adapter that PiSSA and OLoRA
leave behind.

PiSSA and OLoRA decompose each adapted base weight W into the adapter's starting weights
A0, B0 and a residual, W - scaling * B0 @ A0, which replaces W in the base for the whole job.
The trained adapter is therefore relative to that residual. The initial adapter (A0, B0) is
what makes everything else exact: a resumed attempt rebuilds the residual from it instead of
decomposing the base again (`rebuild_residual_base`), and the export converts the adapter back
to one for the original base from it (peft's `path_initial_model_for_weight_conversion`).
It travels in every checkpoint as `INITIAL_ADAPTER_FILE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from shared.schema import BASE_REWRITING_INITS, LoraInit
from shared.storage_keys import INITIAL_ADAPTER_FILE

# Set on a base model whose weights a job rewrote. PiSSA assigns new tensors to the weights,
# which the base cache sees, but OLoRA on an fp32 base subtracts in place through `.data`,
# which bumps no version counter: the mark tells the cache (`base_state`) all the same.
BASE_REWRITTEN_MARK = "tunery_base_weights_rewritten"
# The PeftModel attribute holding the initial adapter's tensors, peft's saved key names.
_INITIAL_WEIGHTS = "tunery_initial_adapter"


def peft_init_lora_weights(lora_init: LoraInit) -> bool | Literal["gaussian"]:
    """`LoraConfig.init_lora_weights` when peft wraps the base: "gaussian" as asked, peft's
    default (True) otherwise. PiSSA and OLoRA decompose afterwards (`decompose_base`); LoftQ
    is applied afterwards too (`peft.replace_lora_weights_loftq`, the form that works on a
    bitsandbytes 4-bit base)."""
    return "gaussian" if lora_init == "gaussian" else True


def decompose_base(model: Any, lora_init: LoraInit) -> None:
    """Initialize every LoRA layer of `model` (a PeftModel) with peft's own PiSSA or OLoRA
    method, and keep the initial adapter.

    Not through `LoraConfig(init_lora_weights=...)`: there peft computes the residual from
    the fp32 decomposition and then casts the adapter to a bf16 base's dtype and back, so the
    adapter training starts from is not the one the residual was computed with, and no saved
    adapter could rebuild that residual exactly. Here the adapter stays as decomposed. PiSSA
    runs the exact SVD: on CPU it took 0.6 s for the tiny test model against 2.5 s for the
    randomized 'pissa_niter_16'.
    """
    from peft.tuners.lora import LoraLayer

    mark_base_rewritten(model)
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            if lora_init == "pissa":
                module.pissa_init("default", "pissa")
            else:
                module.olora_init("default")
    # On record, as peft would have written it; a resume never reads it to initialize.
    model.peft_config["default"].init_lora_weights = lora_init
    keep_initial_adapter(model)


def rewrites_base(lora_init: LoraInit) -> bool:
    return lora_init in BASE_REWRITING_INITS


def mark_base_rewritten(model: Any) -> None:
    """Record on the base model (the PeftModel's, or `model` itself) that its weights were
    rewritten, so that no later job gets it from the cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    setattr(base, BASE_REWRITTEN_MARK, True)


def keep_initial_adapter(model: Any) -> None:
    """Keep a copy of the freshly initialized adapter of `model` (a PeftModel) on it."""
    from peft import get_peft_model_state_dict

    weights = {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()}
    setattr(model, _INITIAL_WEIGHTS, weights)


def initial_adapter(model: Any) -> dict[str, torch.Tensor] | None:
    """The initial adapter `keep_initial_adapter` or `rebuild_residual_base` kept; None for
    an adapter whose base was never rewritten."""
    return getattr(model, _INITIAL_WEIGHTS, None)


def save_initial_adapter(model: Any, checkpoint_dir: Path) -> None:
    """Write the initial adapter into a checkpoint directory, if the job has one."""
    from safetensors.torch import save_file

    weights = initial_adapter(model)
    if weights is not None:
        save_file(weights, str(checkpoint_dir / INITIAL_ADAPTER_FILE), metadata={"format": "pt"})


def write_initial_adapter_dir(model: Any, directory: Path) -> Path:
    """The initial adapter as an adapter directory peft's weight conversion loads (peft writes
    its config there itself)."""
    from safetensors.torch import save_file

    weights = initial_adapter(model)
    assert weights is not None
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def rebuild_residual_base(model: Any, initial_file: Path) -> None:
    """Turn the base of `model` (a PeftModel fresh from `get_peft_model` with a plain
    initialization) into the residual a PiSSA/OLoRA initialization left, from the saved
    initial adapter, and put that adapter's weights in place.

    The residual is computed as peft computes it, (W32 - (scaling * B0) @ A0) cast to W's
    dtype, so it is bit-identical to the decomposition's, and no SVD or QR runs again.
    """
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    weights = load_file(str(initial_file))
    set_peft_model_state_dict(model, weights)
    mark_base_rewritten(model)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            scaling = module.scaling["default"]
            a0 = module.lora_A["default"].weight.to(torch.float32)
            b0 = module.lora_B["default"].weight.to(torch.float32)
            weight = module.get_base_layer().weight
            residual = weight.to(torch.float32) - scaling * b0 @ a0
            weight.data = residual.to(weight.dtype)
    setattr(model, _INITIAL_WEIGHTS, weights)
