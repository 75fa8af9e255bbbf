"""DPO on the tiny model: run_job with preference_optimization "DPO", real TRL steps in fp32 on
the CPU, the reference being the base model with the adapter disabled."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.schema import FinetuneRequest
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.storage_keys import job_artifact_key
from tests.worker.test_preference import write_preference_dataset
from worker.pipeline.checkpoints import CheckpointStore, find_latest_checkpoint
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.report import METRIC_KEYS, RecordingReporter
from worker.pipeline.run import TrainResult, run_job

# As tests/worker/test_checkpoints.py measured for supervised jobs: far below what one
# optimizer step moves a weight at this learning rate.
RESUME_ATOL = 1e-6
DPO_KEYS = {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"}


@dataclass
class Job:
    result: TrainResult
    reporter: RecordingReporter


@dataclass
class DpoSetup:
    request: FinetuneRequest
    settings: Settings
    storage: LocalStorage
    tmp: Path
    rows: list[dict[str, str]]


@pytest.fixture(scope="module")
def dpo_setup(
    tmp_path_factory: pytest.TempPathFactory, make_request: Any, tiny_model_dir: Path
) -> DpoSetup:
    """A DPO request: 30 rows, 24 to train on and 6 to evaluate, 2 epochs of micro-batches
    of 2 accumulated 2 at a time (6 optimizer steps an epoch, 12 in all), in fp32."""
    tmp = tmp_path_factory.mktemp("dpo-job")
    data_path = write_preference_dataset(tmp / "preferences.jsonl", n=30)
    settings = Settings(data_dir=tmp / "data", allowed_local_dirs=[tmp, tiny_model_dir.parent],
                        cpu_bf16="off")
    request = make_request(
        data_path,
        data={"data_split_config": {"train": 0.8, "validation": 0.2}},
        training={"preference_optimization": "DPO", "num_train_epochs": 2,
                  "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                  # Every step must run: the resume test compares them all.
                  "early_stopping_patience": 100},
    )
    rows = [json.loads(line) for line in data_path.read_text().splitlines()]
    return DpoSetup(request, settings, LocalStorage(tmp / "storage"), tmp, rows)


@pytest.fixture(scope="module")
def dpo_job(dpo_setup: DpoSetup) -> Job:
    """The DPO request run uninterrupted, without checkpoints; its adapter stored as job
    `dpo-a`'s final adapter."""
    setup, reporter = dpo_setup, RecordingReporter()
    result = run_job(setup.request, setup.tmp / "work", reporter, setup.settings)
    for path in result.output_dir.iterdir():
        if path.is_file():
            setup.storage.put_file(job_artifact_key("dpo-a", path.name), path)
    return Job(result, reporter)


def answer_log_probability(model: Any, tokenizer: Any, prompt: str, answer: str) -> float:
    """log p(answer + EOS | prompt) under `model`, tokenized as one text, the answer's
    tokens being those past the prompt's own."""
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + answer + ("" if answer.endswith(eos) else eos))["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b),
                 len(prompt_ids))
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[0, :-1].float()
    per_token = logits.log_softmax(-1).gather(-1, tokens[0, 1:, None])[:, 0]
    return float(per_token[start - 1:].sum())


def margins(model: Any, tokenizer: Any, rows: Sequence[dict[str, str]]) -> list[float]:
    """Per pair: log p(chosen) - log p(rejected), given its prompt."""
    return [answer_log_probability(model, tokenizer, r["prompt"], r["chosen"])
            - answer_log_probability(model, tokenizer, r["prompt"], r["rejected"])
            for r in rows]


def test_dpo_raises_the_chosen_minus_rejected_margin_of_the_training_pairs_over_the_base(
    dpo_setup: DpoSetup, dpo_job: Job, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    before = margins(base, tiny_tokenizer, dpo_setup.rows)
    tuned = PeftModel.from_pretrained(base, dpo_job.result.output_dir).eval()
    after = margins(tuned, tiny_tokenizer, dpo_setup.rows)

    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    assert mean_after > mean_before + 10, (mean_before, mean_after)
    assert sum(a > b for a, b in zip(after, before, strict=True)) >= 0.9 * len(after)
    with tuned.disable_adapter():
        # The reference DPO measured against: the base, untouched by training.
        assert margins(tuned, tiny_tokenizer, dpo_setup.rows[:3]) == pytest.approx(before[:3])


def test_dpo_metrics_reach_the_job_metrics_and_log_lines(dpo_job: Job) -> None:
    reporter = dpo_job.reporter
    assert dpo_job.result.steps == 12
    assert (dpo_job.result.train_rows, dpo_job.result.eval_rows) == (24, 6)
    trained = [values for _step, values in reporter.metrics if "loss" in values]
    assert len(trained) == 12
    for values in trained:
        assert set(values) <= METRIC_KEYS
        assert set(values) >= DPO_KEYS
        assert values["reward_margin"] == pytest.approx(
            values["reward_chosen"] - values["reward_rejected"], abs=1e-5)
        assert values["tokens_per_s"] > 0
    # Step 1 trains the fresh adapter, whose B matrices are zero: the policy is the reference,
    # every reward 0 and the loss -log sigmoid(0).
    assert trained[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert trained[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert trained[-1]["reward_margin"] > 1.0 and trained[-1]["reward_accuracy"] == 1.0
    eval_losses = reporter.values("eval_loss")
    assert eval_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert min(eval_losses) < eval_losses[0]
    lines = "\n".join(reporter.lines)
    assert "DPO: the prompt_template is not used" in lines
    assert "DPO: beta 0.1, max_length 64 tokens, reference: the base model (adapter disabled)" \
        in lines
    assert "batch 2 x 2" in lines
    assert "| reward_margin " in lines and "| reward_chosen " in lines


def test_dpo_exports_the_trained_adapter_alone(dpo_job: Job) -> None:
    files = list(dpo_job.result.output_dir.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in files}
    # No second adapter (TRL's reference copy would be written to a folder of its own).
    assert not [p.name for p in files if p.is_dir()]
    config = json.loads((dpo_job.result.output_dir / "adapter_config.json").read_text())
    assert config["r"] == 8


def test_stopped_dpo_job_resumes_from_its_checkpoint_and_ends_with_the_uninterrupted_adapter(
    dpo_setup: DpoSetup, dpo_job: Job
) -> None:
    setup = dpo_setup
    store = CheckpointStore(setup.storage, "dpo-b", every_steps=2, keep=2)
    # Stop is asked while step 5 is reported: training stops after step 6, whose save is
    # skipped, so the second attempt starts from step 4's checkpoint, mid-epoch.
    first = RecordingReporter(stop_after_step=5)
    with pytest.raises(TrainingStopped):
        run_job(setup.request, setup.tmp / "b1", first, setup.settings, store)
    latest = find_latest_checkpoint(setup.storage, "dpo-b")
    assert latest is not None and latest.step == 4

    second = RecordingReporter()
    store = replace(store, attempt=2)  # the attempt that resumes
    result = run_job(setup.request, setup.tmp / "b2", second, setup.settings, store)

    assert "resumed from step 4 (attempt 2)" in second.lines
    assert result.steps == dpo_job.result.steps == 12
    assert second.steps("loss") == list(range(5, 13))
    # Same batches, optimizer state and reference: steps 5-12 are the uninterrupted run's.
    assert second.values("loss") == pytest.approx(dpo_job.reporter.values("loss")[4:], abs=1e-6)
    assert second.values("reward_margin") == pytest.approx(
        dpo_job.reporter.values("reward_margin")[4:], abs=1e-5)
    resumed = load_file(result.output_dir / "adapter_model.safetensors")
    reference = load_file(dpo_job.result.output_dir / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for name, tensor in resumed.items():
        torch.testing.assert_close(tensor, reference[name], atol=RESUME_ATOL, rtol=0)


def test_dpo_continuing_an_earlier_adapter_measures_it_against_the_base_model(
    dpo_setup: DpoSetup, dpo_job: Job, make_request: Any
) -> None:
    """The reference is the base with the adapter disabled, not a copy of the adapter the job
    starts from (TRL's own choice for a PeftModel): the earlier DPO adapter already prefers
    the chosen answers, so the first step's rewards are far from 0."""
    setup = dpo_setup
    request = setup.request.model_copy(deep=True)
    request.pretrainedmodel_config.resume_checkpoint_path = "dpo-a"
    reporter = RecordingReporter(stop_after_step=1)
    store = CheckpointStore(setup.storage, "dpo-c", every_steps=0, keep=1)

    with pytest.raises(TrainingStopped):
        run_job(request, setup.tmp / "c", reporter, setup.settings, store)

    assert "continuing from the final adapter of job dpo-a" in reporter.lines
    first = next(values for _step, values in reporter.metrics if "loss" in values)
    assert first["reward_margin"] > 1.0
    assert first["loss"] < math.log(2) / 2
    # Its evaluation before the first step already reads the earlier adapter's eval_loss.
    assert reporter.values("eval_loss")[0] == pytest.approx(
        min(dpo_job.reporter.values("eval_loss")), abs=1e-4)
