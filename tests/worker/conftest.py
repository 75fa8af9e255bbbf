"""Fixtures for the worker tests: the tiny Llama's tokenizer, settings, requests on it."""

from __future__ import annotations

import os

# Set before huggingface_hub is imported: a hub lookup fails at once instead of retrying
# for a minute on a machine without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from shared.schema import FinetuneRequest  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.conftest import SHORT_ALPACA_TEMPLATE  # noqa: E402
from worker.assets.build_dataset import DATASET_PATH  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir: Path) -> Any:
    """The tiny model with a fresh LoRA adapter, in eval mode, in fp32 whatever the CPU: the
    batch layout tests compare losses to float32 rounding."""
    from shared.schema import PretrainedModelConfig
    from worker.pipeline.model import load_model

    model = load_model(
        str(tiny_model_dir),
        PretrainedModelConfig(model_path=str(tiny_model_dir), lora_dropout=0.0),
        allowed_local_dirs=[tiny_model_dir.parent],
        cpu_bf16="off",
    )
    return model.eval()


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        allowed_local_dirs=[tmp_path, tiny_model_dir.parent, DATASET_PATH.parent],
    )


def build_request(
    model_dir: Path,
    data_path: Path | str = DATASET_PATH,
    *,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    logging: dict[str, Any] | None = None,
    hf: dict[str, Any] | None = None,
) -> FinetuneRequest:
    """A small, fast job on the tiny model: 24 train / 12 validation rows, 6 steps."""
    return FinetuneRequest.model_validate(
        {
            "pretrainedmodel_config": {"model_path": str(model_dir), **(model or {})},
            "data_config": {
                "data_path": str(data_path),
                "prompt_template": SHORT_ALPACA_TEMPLATE,
                "cutoff_len": 64,
                "data_split_config": {"train": 0.08, "validation": 0.04},
                **(data or {}),
            },
            "training_config": {
                "num_train_epochs": 1,
                "learning_rate": 0.01,
                "warmup_steps": 1,
                "lr_scheduler_type": "linear",
                **(training or {}),
            },
            "logging_config": logging or {},
            "hf_config": hf or {},
        }
    )


@pytest.fixture(scope="session")
def make_request(tiny_model_dir: Path) -> Any:
    """`make_request(data_path=..., model={...}, data={...}, training={...}, logging={...},
    hf={...})` on the tiny model."""

    def make(data_path: Path | str = DATASET_PATH, **sections: Any) -> FinetuneRequest:
        return build_request(tiny_model_dir, data_path, **sections)

    return make
