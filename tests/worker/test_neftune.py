"""training_config.neftune_noise_alpha on the tiny model: NEFTune's noise reaches the training
steps, which the tiny Llama trains with the labelled loss (its decoder called directly), is
seeded like the rest of the run, and never reaches an evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.settings import Settings
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import TrainResult, run_job

Run = tuple[TrainResult, RecordingReporter, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def train_with_alpha(
    tmp_path_factory: pytest.TempPathFactory, make_request: Any, tiny_model_dir: Path
) -> Callable[..., Run]:
    """Runs the tiny job (seed 7, no LoRA dropout: the only randomness in a step is the noise)
    with the given neftune_noise_alpha, or none for `None`."""
    tmp = tmp_path_factory.mktemp("neftune")
    settings = Settings(data_dir=tmp / "data",
                        allowed_local_dirs=[DATASET_PATH.parent, tiny_model_dir.parent])

    runs: dict[tuple[float | None, int], Run] = {}

    def train(alpha: float | None, again: int = 0) -> Run:
        """The run for `alpha`, once per module: `again` > 0 asks for another one."""
        if (alpha, again) not in runs:
            runs[alpha, again] = _train(alpha)
        return runs[alpha, again]

    def _train(alpha: float | None) -> Run:
        fields = {} if alpha is None else {"neftune_noise_alpha": alpha}
        request = make_request(model={"lora_dropout": 0.0}, training={"seed": 7, **fields})
        reporter = RecordingReporter()
        result = run_job(request, tmp / f"work-{len(list(tmp.iterdir()))}", reporter, settings)
        return result, reporter, load_file(result.output_dir / "adapter_model.safetensors")

    return train


def test_neftune_changes_the_training_losses_and_the_adapter_but_not_an_evaluation(
    train_with_alpha: Callable[..., Run],
) -> None:
    _, plain, plain_adapter = train_with_alpha(None)
    _, noisy, noisy_adapter = train_with_alpha(5.0)

    # The first step starts from the same adapter: only the noise tells the losses apart.
    assert noisy.values("loss")[0] != plain.values("loss")[0]
    assert any(not torch.equal(noisy_adapter[name], weight)
               for name, weight in plain_adapter.items())
    # Step 0's evaluation, inside the same `train()` and of the same (untrained) adapter, is
    # computed without noise: the embedding's hook adds it in train mode only.
    assert noisy.steps("eval_loss")[0] == plain.steps("eval_loss")[0] == 0
    assert noisy.values("eval_loss")[0] == plain.values("eval_loss")[0]
    assert noisy.values("eval_mean_token_accuracy")[0] == plain.values(
        "eval_mean_token_accuracy")[0]


def test_two_neftune_jobs_with_the_same_seed_train_the_same_adapter(
    train_with_alpha: Callable[..., Run],
) -> None:
    _, first, first_adapter = train_with_alpha(5.0)
    _, again, again_adapter = train_with_alpha(5.0, 1)

    assert first.values("loss") == again.values("loss")
    assert first_adapter.keys() == again_adapter.keys()
    assert all(torch.equal(again_adapter[name], weight) for name, weight in first_adapter.items())
