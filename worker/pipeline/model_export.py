"""The export stage of a full fine-tune: the whole trained model, written locally as a
transformers checkpoint; it leaves the worker in `worker.publish` like an adapter."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from shared.storage_keys import FULL_MODEL_CONFIG, is_full_model_weights
from worker.pipeline.model import COMPUTE_DTYPE_ATTRIBUTE
from worker.pipeline.report import LogFn, no_log

# Shards small enough to upload and download one by one without holding a whole 7B model
# file: a 7B model in fp32 is 14 of them.
MAX_SHARD_SIZE = "2GB"


def export_full_model(
    model: Any, tokenizer: Any, output_dir: Path, *, base_model: str, log: LogFn = no_log,
) -> Path:
    """Write the trained model as safetensors shards (`model.safetensors`, or
    `model-0000i-of-0000n.safetensors` and their index), `config.json`,
    `generation_config.json` and the tokenizer files: a directory `from_pretrained` loads.

    The weights are saved in fp32, as trained. `config.json` names `base_model` (the
    model_path the user gave) as where it comes from. `output_dir` is emptied first."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    # Tunery's own bookkeeping on the model is no part of what is saved.
    if hasattr(model, COMPUTE_DTYPE_ATTRIBUTE):
        delattr(model, COMPUTE_DTYPE_ATTRIBUTE)
    model.config._name_or_path = base_model
    # Training turns the KV cache off; whoever loads the model generates with it.
    model.config.use_cache = True
    model.save_pretrained(output_dir, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    names = {p.name for p in output_dir.iterdir()}
    if FULL_MODEL_CONFIG not in names or not any(map(is_full_model_weights, names)):
        raise RuntimeError(f"transformers did not write the model to {output_dir}: {names}")
    tokenizer.save_pretrained(output_dir)
    size = sum(p.stat().st_size for p in output_dir.iterdir() if p.is_file())
    log(f"full model and tokenizer saved: {size / 1e6:.1f} MB")
    return output_dir
