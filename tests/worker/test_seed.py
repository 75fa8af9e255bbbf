"""training_config.seed on the tiny model: the same seed trains the same adapter, another
seed another one, and no seed trains as the worker always did (seed 42)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.settings import Settings
from shared.training_plan import DEFAULT_SEED
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job

Adapter = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def train_with_seed(
    tmp_path_factory: pytest.TempPathFactory, make_request: Any, tiny_model_dir: Path
) -> Callable[..., tuple[Adapter, RecordingReporter]]:
    """Runs the tiny job (LoRA dropout on, so that the seed reaches dropout too) with
    `training_config.seed` = the given seed, or none for `None`; returns its adapter."""
    tmp = tmp_path_factory.mktemp("seeded")
    settings = Settings(data_dir=tmp / "data",
                        allowed_local_dirs=[DATASET_PATH.parent, tiny_model_dir.parent])

    def train(seed: int | None, **training: Any) -> tuple[Adapter, RecordingReporter]:
        fields = {} if seed is None else {"seed": seed}
        request = make_request(model={"lora_dropout": 0.1}, training={**fields, **training})
        reporter = RecordingReporter()
        work = tmp / f"work-{len(list(tmp.iterdir()))}"
        result = run_job(request, work, reporter, settings)
        return load_file(result.output_dir / "adapter_model.safetensors"), reporter

    return train


def same(a: Adapter, b: Adapter) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("group_by_length", [None, False], ids=["length-buckets", "random"])
def test_two_jobs_with_the_same_seed_train_the_same_adapter_and_another_seed_another(
    train_with_seed: Callable[..., tuple[Adapter, RecordingReporter]],
    group_by_length: bool | None,
) -> None:
    first, first_log = train_with_seed(7, group_by_length=group_by_length)
    again, _ = train_with_seed(7, group_by_length=group_by_length)
    other, other_log = train_with_seed(8, group_by_length=group_by_length)

    assert same(first, again)
    assert not same(first, other)
    assert any(line.startswith("split (seed 7)") for line in first_log.lines)
    assert any(line.startswith("split (seed 8)") for line in other_log.lines)


def test_a_job_without_a_seed_trains_as_with_the_default_seed(
    train_with_seed: Callable[..., tuple[Adapter, RecordingReporter]],
) -> None:
    unseeded, log = train_with_seed(None)
    seeded, _ = train_with_seed(DEFAULT_SEED)

    assert DEFAULT_SEED == 42
    assert same(unseeded, seeded)
    assert any(line.startswith("split (seed 42)") for line in log.lines)
