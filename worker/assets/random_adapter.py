"""A LoRA adapter with random weights for a local base model, saved as peft saves one, for
tests and benchmarks of serving: a fresh adapter's B matrices are zero and change nothing, so
these are drawn non-zero and every adapter (by its seed) changes the model's output."""

from __future__ import annotations

import json
from pathlib import Path


def build_random_adapter(base_dir: Path, dest: Path, seed: int, r: int = 4,
                         scale: float = 0.3) -> Path:
    """Save to `dest` a LoRA adapter (rank `r`, alpha 2r, every linear layer) for the model
    in `base_dir`, with its B matrices drawn from N(0, scale²) by `seed`; its config names
    `base_dir` as its base, as an exported job's adapter names the base the job used."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r,
                                                  target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(dest))
    config_path = dest / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config))
    return dest
