"""ORPO on the tiny model: run_job with preference_optimization "ORPO" on a preference dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from shared.schema import FinetuneRequest
from shared.settings import Settings
from shared.storage import LocalStorage
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.checkpoints import CheckpointStore
from worker.pipeline.errors import PipelineError, TrainingStopped
from worker.pipeline.report import METRIC_KEYS, RecordingReporter
from worker.pipeline.run import TrainResult, run_job

# One answer that is wrong and wordy for every question: ORPO learns to prefer the terse,
# right answers of the sample dataset over it.
REJECTED = "Well, I am not entirely sure, but it is probably something else, let me think."


def write_preference_dataset(path: Path, n: int = 24) -> Path:
    """`n` rows from the alpaca sample: prompt = instruction (+ input), chosen = its answer."""
    rows = [json.loads(line) for line in DATASET_PATH.read_text().splitlines()[:n]]
    with path.open("w") as out:
        for row in rows:
            prompt = f"{row['instruction']} {row['input']}".strip() + "\nAnswer: "
            record = {"prompt": prompt, "chosen": row["output"], "rejected": REJECTED}
            out.write(json.dumps(record) + "\n")
    return path


@dataclass
class Job:
    result: TrainResult
    reporter: RecordingReporter


@dataclass
class OrpoSetup:
    request: FinetuneRequest
    settings: Settings
    tmp: Path


@pytest.fixture(scope="module")
def orpo_setup(
    tmp_path_factory: pytest.TempPathFactory, make_request: Any, tiny_model_dir: Path
) -> OrpoSetup:
    """An ORPO request: 24 rows, all for training, 2 epochs of 6 steps at batch 4."""
    tmp = tmp_path_factory.mktemp("orpo-job")
    data_path = write_preference_dataset(tmp / "preferences.jsonl")
    settings = Settings(data_dir=tmp / "data", allowed_local_dirs=[tmp, tiny_model_dir.parent])
    request = make_request(
        data_path,
        data={"data_split_config": {"train": 1.0, "validation": 0.0}},
        training={"preference_optimization": "ORPO", "num_train_epochs": 2},
    )
    return OrpoSetup(request, settings, tmp)


@pytest.fixture(scope="module")
def orpo_job(orpo_setup: OrpoSetup) -> Job:
    """The ORPO request run uninterrupted, without checkpoints."""
    reporter = RecordingReporter()
    setup = orpo_setup
    return Job(run_job(setup.request, setup.tmp / "work", reporter, setup.settings), reporter)


def test_orpo_lowers_the_loss_and_raises_the_log_odds_of_chosen_answers(orpo_job: Job) -> None:
    reporter = orpo_job.reporter
    assert orpo_job.result.steps == 12
    losses = reporter.values("loss")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    log_odds = reporter.values("log_odds_ratio")
    assert sum(log_odds[-3:]) / 3 > sum(log_odds[:3]) / 3
    assert reporter.values("reward_margin")[-1] > reporter.values("reward_margin")[0]


def test_orpo_metrics_and_log_lines_are_orpo_specific(orpo_job: Job) -> None:
    reporter = orpo_job.reporter
    for step, values in reporter.metrics:
        assert set(values) <= METRIC_KEYS, step
        assert {"nll_loss", "log_odds_ratio", "reward_margin", "reward_accuracy"} <= set(values)
        # ORPO's loss is the supervised loss on the chosen answer minus beta x the log-odds term.
        assert values["loss"] == pytest.approx(
            values["nll_loss"] - 0.1 * values["log_odds_ratio"], rel=1e-3
        )
    lines = "\n".join(reporter.lines)
    assert "prompt_template is not used" in lines
    assert "max_length 64 tokens" in lines
    assert "| nll_loss " in lines and "| log_odds_ratio " in lines


def test_orpo_exports_the_adapter(orpo_job: Job) -> None:
    files = {p.name for p in orpo_job.result.output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files


def test_stopped_orpo_job_resumes_from_its_checkpoint_with_the_uninterrupted_losses(
    orpo_setup: OrpoSetup, orpo_job: Job
) -> None:
    setup = orpo_setup
    store = CheckpointStore(LocalStorage(setup.tmp / "storage"), "orpo", every_steps=2, keep=2)
    # Stop is asked while step 5 is reported: training stops after step 6, whose save is
    # skipped, so the second attempt starts from step 4's checkpoint.
    first = RecordingReporter(stop_after_step=5)
    with pytest.raises(TrainingStopped):
        run_job(setup.request, setup.tmp / "r1", first, setup.settings, store)

    second = RecordingReporter()
    store = replace(store, attempt=2)  # the attempt that resumes
    result = run_job(setup.request, setup.tmp / "r2", second, setup.settings, store)

    assert "resumed from step 4 (attempt 2)" in second.lines
    assert result.steps == orpo_job.result.steps == 12
    assert second.steps("loss") == list(range(5, 13))
    # Same batches, same optimizer state: the ORPO losses of steps 5-12 are the uninterrupted
    # run's (which saved no checkpoints, so saving does not change the run either).
    reference = orpo_job.reporter.values("loss")[4:]
    assert second.values("loss") == pytest.approx(reference, abs=1e-5)
    assert second.values("log_odds_ratio") == pytest.approx(
        orpo_job.reporter.values("log_odds_ratio")[4:], abs=1e-4
    )


def test_orpo_without_preference_columns_names_the_missing_ones(
    tmp_path: Path, make_request: Any, settings: Settings
) -> None:
    data_path = tmp_path / "half.jsonl"
    data_path.write_text(json.dumps({"prompt": "2 + 2?", "answer": "4"}) + "\n")
    request = make_request(data_path, training={"preference_optimization": "ORPO"})
    with pytest.raises(PipelineError) as caught:
        run_job(request, tmp_path / "work", RecordingReporter(), settings)
    message = str(caught.value)
    assert "['chosen', 'rejected']" in message
    assert "['prompt', 'answer']" in message
