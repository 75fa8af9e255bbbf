"""The merge stage of an export: a job's base model with its LoRA adapter folded into the
weights, saved as a plain transformers checkpoint that needs neither peft nor the adapter."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from shared.storage_keys import ADAPTER_FILES
from worker.pipeline.errors import PipelineError
from worker.pipeline.model import (
    CpuBf16,
    compute_dtype,
    hub_options,
    opened_model_source,
)
from worker.pipeline.report import LogFn, no_log

DEFAULT_MAX_SHARD_SIZE = "2GB"
"""Shards of this size stay under the single-object limits of every S3 flavour Tunery is run
against, and are what llama.cpp's converter reads one at a time."""


def merge_dtype(cpu_bf16: CpuBf16 = "auto") -> torch.dtype:
    """The dtype the base is loaded and merged in: the worker's `compute_dtype` when that is
    bf16, fp32 otherwise. fp16 (an older GPU's compute dtype) is never used: adding the
    adapter's delta in fp16 can overflow where training, in autocast, did not."""
    return torch.bfloat16 if compute_dtype(cpu_bf16) == torch.bfloat16 else torch.float32


def merge_adapter(
    model_path: str,
    adapter_dir: Path,
    output_dir: Path,
    *,
    allowed_local_dirs: Iterable[Path],
    token: str | None = None,
    cache_dir: Path | None = None,
    local_files_only: bool = False,
    cpu_bf16: CpuBf16 = "auto",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    log: LogFn = no_log,
) -> Path:
    """Load `model_path` unquantized, apply the adapter in `adapter_dir` (the job's artifacts:
    `adapter_model.safetensors`, `adapter_config.json` and the tokenizer files), merge it and
    write safetensors shards, config and tokenizer to `output_dir` (emptied first).

    The base is resolved exactly as training resolved it (`opened_model_source`, the allowed
    local directories, the job's token and hub cache), so nothing is downloaded that the job
    did not already download; with `local_files_only`, a hub base is read from `cache_dir`
    alone (a private base, once the job's token is gone). A QLoRA job is merged into the
    unquantized base too: folding a delta into 4-bit weights would round it away. The
    tokenizer comes from `adapter_dir`, where the job saved the one it trained with.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise PipelineError(f"the job's adapter is incomplete in storage: {missing} missing")
    dtype = merge_dtype(cpu_bf16)
    with opened_model_source(model_path, allowed_local_dirs) as source:
        try:
            base: Any = AutoModelForCausalLM.from_pretrained(
                source.load_from, dtype=dtype, trust_remote_code=False, use_safetensors=True,
                local_files_only=local_files_only, **hub_options(token, cache_dir),
            )
        except Exception as exc:  # any failure here means "this model cannot be loaded"
            raise PipelineError(
                f"could not load model {model_path!r}: {type(exc).__name__}: {exc}"
            ) from None
    if getattr(base, "is_quantized", False):
        # A checkpoint saved quantized loads quantized whatever dtype is asked for.
        raise PipelineError(
            f"model {model_path!r} is stored quantized; a merged export needs a base in full "
            "or half precision"
        )
    log(f"base model {model_path!r} loaded in {dtype} for merging")
    try:
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except Exception as exc:  # an adapter of another base (shapes, module names)
        raise PipelineError(
            f"could not apply the job's adapter to {model_path!r}: {type(exc).__name__}: {exc}"
        ) from None
    # Named as the user named the base, never by the private view it was read through.
    merged.config._name_or_path = model_path
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    merged.save_pretrained(output_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False)
    tokenizer.save_pretrained(output_dir)
    _drop_adapter_leftovers(output_dir)
    size = sum(p.stat().st_size for p in output_dir.iterdir() if p.is_file())
    log(f"merged model saved: {size / 1e6:.1f} MB")
    return output_dir


def _drop_adapter_leftovers(output_dir: Path) -> None:
    """A merged checkpoint must not look like an adapter to loaders that sniff files."""
    for name in ADAPTER_FILES:
        (output_dir / name).unlink(missing_ok=True)
