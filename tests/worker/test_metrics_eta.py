"""The ETA in the training log: the pace of the steps after the first, never the first step's
warm-up, driven through `MetricsCallback` with a fake clock."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from tests.fake_clock import FakeClock
from worker.pipeline.callbacks import MetricsCallback
from worker.pipeline.report import RecordingReporter


@pytest.fixture
def args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             include_num_input_tokens_seen="no")


def _train(args: TrainingArguments, *, start_step: int, total: int,
           step_seconds: list[float]) -> RecordingReporter:
    """Run the callback through one step per entry of `step_seconds`, each taking that long,
    logging a loss after each as the Trainer does with logging_steps=1."""
    reporter, clock = RecordingReporter(), FakeClock()
    callback = MetricsCallback(reporter, clock=clock)
    state, control = TrainerState(), TrainerControl()
    state.global_step, state.max_steps, state.epoch = start_step, total, 0.0
    callback.on_train_begin(args, state, control)
    for seconds in step_seconds:
        clock.now += seconds
        state.global_step += 1
        state.epoch = state.global_step / total
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs={"loss": 2.0, "learning_rate": 1e-4})
    return reporter


def _etas(reporter: RecordingReporter) -> list[str]:
    return [re.sub(r".*\| eta ", "", line) for line in reporter.lines if "| loss " in line]


def test_the_first_steps_warm_up_does_not_inflate_the_eta(args: TrainingArguments) -> None:
    # A 6-step job whose first step compiles for a minute, then takes 2 s a step.
    reporter = _train(args, start_step=0, total=6, step_seconds=[60, 2, 2, 2, 2, 2])

    assert _etas(reporter) == ["–", "8s", "6s", "4s", "2s", "0s"]
    assert reporter.lines[1] == "epoch 1 | step 1/6 (17%) | loss 2.0000 | lr 1.0e-04 | eta –"
    assert reporter.steps("eta_s") == [2, 3, 4, 5, 6]
    assert reporter.values("eta_s") == pytest.approx([8.0, 6.0, 4.0, 2.0, 0.0])
    assert reporter.steps("loss") == [1, 2, 3, 4, 5, 6]


def test_the_eta_follows_the_average_pace_since_the_first_step(args: TrainingArguments) -> None:
    reporter = _train(args, start_step=0, total=10, step_seconds=[30, 1, 3])

    # After step 3: 4 s for steps 2 and 3, so 2 s a step for the 7 left.
    assert _etas(reporter) == ["–", "8s", "14s"]


def test_a_resumed_run_paces_from_its_own_first_step(args: TrainingArguments) -> None:
    reporter = _train(args, start_step=10, total=16, step_seconds=[45, 1, 1])

    assert _etas(reporter) == ["–", "4s", "3s"]
    assert reporter.steps("eta_s") == [12, 13]


def test_a_one_step_job_reports_no_eta(args: TrainingArguments) -> None:
    reporter = _train(args, start_step=0, total=1, step_seconds=[5])

    assert _etas(reporter) == ["–"]
    assert reporter.values("eta_s") == []
