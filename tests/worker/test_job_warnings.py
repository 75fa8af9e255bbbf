"""What the worker changes in a job, or doubts about it, is said in the log and kept in the job's
warnings: a warm-up cut to fit a short run (transformers would otherwise run short jobs at
little or no learning rate), the default prompt template, a run that never improved."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobLog, JobStatus
from shared.schema import DataConfig, FinetuneRequest, TrainingConfig
from shared.settings import Settings, get_settings
from tests.conftest import ASSETS_DIR, SHORT_ALPACA_TEMPLATE
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job
from worker.tasks import train

DEFAULT_TEMPLATE = DataConfig.model_fields["prompt_template"].default


def sample_rows(directory: Path, count: int) -> Path:
    """The first `count` rows of the sample dataset, as a file of their own."""
    path = directory / f"rows-{count}.jsonl"
    path.write_text("".join(DATASET_PATH.read_text().splitlines(keepends=True)[:count]))
    return path


@pytest.fixture
def run_stored_job(
    tunery_env: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[dict[str, Any]], tuple[Job, list[str]]]:
    """`run_stored_job(payload)`: the payload stored as a job, then run by the worker's task
    as a wake-up runs it (the stored payload read back through the schema, the attempt's
    database reporter); returns the ended job and its log lines."""
    allowed = [str(ASSETS_DIR), str(tunery_env.parent), str(tiny_model_dir.parent)]
    monkeypatch.setenv("TUNERY_ALLOWED_LOCAL_DIRS", json.dumps(allowed))
    get_settings.cache_clear()
    upgrade_database(get_settings().database.url)

    def run(payload: dict[str, Any]) -> tuple[Job, list[str]]:
        with session_scope() as session:
            tenant_id = create_api_key(session, "owner").tenant_id
            job_id = jobs.create_job(
                session, tenant_id, FinetuneRequest.model_validate(payload), max_attempts=1,
                device_class="train"
            ).id
        train.run(job_id)
        with session_scope() as session:
            job = session.get_one(Job, job_id)
            session.expunge(job)
            lines = list(session.scalars(
                select(JobLog.line).where(JobLog.job_id == job_id).order_by(JobLog.id)
            ))
        return job, lines

    return run


def eleven_step_payload(tiny_model_dir: Path, data_path: Path) -> dict[str, Any]:
    """44 rows, no validation: 11 steps of 4 examples. warmup_steps and prompt_template are
    left out, as a new user leaves them."""
    return {
        "pretrainedmodel_config": {"model_path": str(tiny_model_dir)},
        "data_config": {
            "data_path": str(data_path),
            "cutoff_len": 64,
            "data_split_config": {"train": 1.0, "validation": 0.0},
        },
        "training_config": {"learning_rate": 0.001, "lr_scheduler_type": "linear"},
        "logging_config": {},
    }


def test_an_eleven_step_job_caps_the_default_warmup_and_keeps_a_warning(
    run_stored_job: Any, tiny_model_dir: Path, tunery_env: Path
) -> None:
    assert TrainingConfig().warmup_steps == 50
    payload = eleven_step_payload(tiny_model_dir, sample_rows(tunery_env.parent, 44))

    job, lines = run_stored_job(payload)

    assert job.status == JobStatus.COMPLETED, job.error
    assert any(line.startswith("training 11 steps") for line in lines)
    (capped,) = [w for w in job.warnings or [] if w.startswith("warm-up capped")]
    assert capped.startswith("warm-up capped from 50 to 1 steps: training_config.warmup_steps 50 "
                             "is longer than the run's 11 optimizer steps")
    assert f"warning: {capped}" in lines
    assert ("warm-up: 1 of 11 steps; the learning rate rises from 0 at step 1 to learning_rate "
            "1.0e-03 at step 2") in lines
    rates = [line.split("| lr ")[1].split(" ")[0] for line in lines if "| lr " in line]
    # The second step trains at the rate asked for, then the linear schedule decays from it.
    assert rates[:2] == ["0.0e+00", "1.0e-03"] and len(rates) == 11


def test_a_left_out_prompt_template_is_logged_as_the_default_with_a_warning(
    run_stored_job: Any, tiny_model_dir: Path, tunery_env: Path
) -> None:
    # One step is enough: the template is read before training.
    payload = eleven_step_payload(tiny_model_dir, sample_rows(tunery_env.parent, 4))

    job, lines = run_stored_job(payload)

    expected = ("prompt_template: the default template (left out of the request): "
                f"\"{DEFAULT_TEMPLATE}\"")
    assert job.status == JobStatus.COMPLETED, job.error
    assert expected in (job.warnings or [])
    assert f"warning: {expected}" in lines


def test_a_given_prompt_template_is_logged_as_it_is_used(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    long_template = "Context: " + "x" * 210 + " {instruction} {input} ### Response: {output}"
    request = make_request(sample_rows(tmp_path, 4),
                           data={"prompt_template": long_template, "cutoff_len": 512})
    reporter = RecordingReporter()

    run_job(request, tmp_path / "work", reporter, settings)

    shown = json.dumps(long_template[:200])
    assert f"prompt_template: {shown}…" in reporter.lines
    assert not [w for w in reporter.warnings if "prompt_template" in w]

    given = RecordingReporter()
    run_job(make_request(sample_rows(tmp_path, 4)), tmp_path / "work2", given, settings)
    assert f"prompt_template: {json.dumps(SHORT_ALPACA_TEMPLATE)}" in given.lines


def test_a_two_row_job_trains_at_the_full_learning_rate_from_its_first_step(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    request = make_request(
        sample_rows(tmp_path, 2),
        data={"data_split_config": {"train": 1.0, "validation": 0.0}},
        training={"warmup_steps": TrainingConfig().warmup_steps, "lr_scheduler_type": "linear"},
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert result.steps == 1
    assert reporter.values("learning_rate") == [pytest.approx(0.01)]
    assert any(w.startswith("warm-up capped from 50 to 0 steps") for w in reporter.warnings)
    assert "warm-up: none; training starts at learning_rate 1.0e-02 (step 1 of 1)" in reporter.lines
    # LoRA starts with B = 0 (the adapter adds nothing); a step at a rate above 0 moves it.
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(tensor) > 0 for tensor in lora_b)


def test_an_orpo_job_gets_the_same_warmup_rule(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    path = tmp_path / "preferences.jsonl"
    rows = [{"prompt": f"Say {i}.", "chosen": f"Answer: {i}.", "rejected": f"I think {i}?"}
            for i in range(6)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    request = make_request(
        path,
        data={"data_split_config": {"train": 1.0, "validation": 0.0}},
        training={"preference_optimization": "ORPO", "warmup_steps": 50},
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert result.steps == 2
    assert any(w.startswith("warm-up capped from 50 to 0 steps") for w in reporter.warnings)
    assert reporter.values("learning_rate")[0] == pytest.approx(0.01)


def test_a_run_that_never_improves_eval_loss_says_so(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    # One step at a learning rate near 1 throws the adapter far off: the evaluation after it
    # is worse than the one before training.
    request = make_request(
        sample_rows(tmp_path, 12),
        data={"data_split_config": {"train": 0.34, "validation": 0.66}},
        training={"learning_rate": 0.9, "lr_scheduler_type": "constant"},
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert result.best_step == 0 and result.steps == 1
    assert any(line.startswith("kept the adapter of step 0") for line in reporter.lines)
    (never,) = [w for w in reporter.warnings if w.startswith("training never improved")]
    assert f"({result.best_eval_loss:.4f})" in never
    assert f"warning: {never}" in reporter.lines
