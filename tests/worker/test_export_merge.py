"""A merged export computes what base + adapter computed: logits of the merged checkpoint,
loaded by plain transformers with no peft, equal the PeftModel's on the tiny model, with an
adapter whose lora_B is random (a fresh adapter's zero lora_B would make any merge pass)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.storage_keys import ADAPTER_FILES
from worker.pipeline.errors import PipelineError
from worker.pipeline.merge import merge_adapter

PROMPTS = ["Below is an instruction", "### Input: the cat", "Write a response that"]


def make_random_adapter(base_dir: Path, adapter_dir: Path, *, seed: int = 7,
                        scale: float = 0.05) -> None:
    """A LoRA adapter on every linear layer of `base_dir`'s model with random non-zero lora_A
    and lora_B, saved with the base's tokenizer as a job saves its artifacts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(adapter_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(adapter_dir)


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("adapter")
    make_random_adapter(tiny_model_dir, path)
    return path


def test_merged_logits_equal_base_plus_adapter_in_fp32(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged",
                               allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off")

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = logits(base, tokenizer)
    with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
    expected = logits(with_adapter, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    # The adapter moves the logits well beyond the tolerance: the comparison can fail.
    assert (expected - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=0)


def test_merged_checkpoint_is_plain_safetensors_in_shards_with_tokenizer(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    merged_dir = merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged",
                               allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off",
                               max_shard_size="200KB")

    names = {p.name for p in merged_dir.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert not names & set(ADAPTER_FILES)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config


def test_a_base_outside_the_allowed_directories_is_refused(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(PipelineError, match="model_path"):
        merge_adapter(str(tiny_model_dir), adapter_dir, tmp_path / "merged",
                      allowed_local_dirs=[tmp_path / "elsewhere"], cpu_bf16="off")
    assert not (tmp_path / "merged").exists()


def test_an_incomplete_adapter_is_refused_naming_the_missing_file(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(PipelineError, match="adapter_model.safetensors"):
        merge_adapter(str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged",
                      allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off")
