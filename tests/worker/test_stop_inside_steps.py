"""A stop asked while the Trainer is inside an evaluation or a step of gradient accumulation
ends it at the next evaluation batch or micro-batch, not at the end of the step; a time limit
still waits for the step's end, whose checkpoint it keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from shared.storage import LocalStorage
from worker.pipeline.checkpoints import CheckpointStore, list_checkpoints
from worker.pipeline.errors import StopReason, TrainingStopped
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job

NO_VALIDATION = {"data_split_config": {"train": 0.08, "validation": 0}}


class StopsAsTrainingStarts(RecordingReporter):
    """Asks to stop for `reason` as the Trainer announces its run ("training N steps: ..."),
    that is before the evaluation of the untrained adapter and before the first micro-batch.
    Counts the polls that follow: one per place the Trainer asked."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__()
        self.reason = reason
        self.polls_after_request: int | None = None

    def log(self, line: str) -> None:
        super().log(line)
        if line.startswith("training ") and self.polls_after_request is None:
            self.request_stop(self.reason)
            self.polls_after_request = 0

    def should_stop(self) -> StopReason | None:
        if self.polls_after_request is not None:
            self.polls_after_request += 1
        return super().should_stop()


def test_a_cancel_during_the_first_evaluation_stops_it_before_any_step(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    reporter = StopsAsTrainingStarts(StopReason.CANCELLED)

    with pytest.raises(TrainingStopped) as stopped:
        run_job(make_request(), tmp_path / "work", reporter, settings)

    assert stopped.value.reason == StopReason.CANCELLED and stopped.value.step == 0
    # Stopped after the evaluation's first batch: it never reported a loss, and no step ran.
    assert reporter.polls_after_request == 1
    assert reporter.steps("eval_loss") == []
    assert reporter.steps("loss") == []
    assert "training stopped at step 0: cancelled" in reporter.lines


def test_a_cancel_during_an_evaluation_between_steps_stops_it(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    # Asked as step 2's loss is logged, that is just before step 2's evaluation.
    reporter = RecordingReporter(stop_after_step=2)

    with pytest.raises(TrainingStopped) as stopped:
        run_job(make_request(), tmp_path / "work", reporter, settings)

    assert stopped.value.reason == StopReason.CANCELLED and stopped.value.step == 2
    assert reporter.steps("loss") == [1, 2]
    assert reporter.steps("eval_loss") == [0, 1]


def test_a_cancel_inside_a_step_stops_at_the_next_micro_batch(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    request = make_request(data=NO_VALIDATION, training={"gradient_accumulation_steps": 4})
    reporter = StopsAsTrainingStarts(StopReason.CANCELLED)

    with pytest.raises(TrainingStopped) as stopped:
        run_job(request, tmp_path / "work", reporter, settings)

    # After the first of the step's 4 micro-batches: the step never ended.
    assert stopped.value.reason == StopReason.CANCELLED and stopped.value.step == 0
    assert reporter.polls_after_request == 1
    assert reporter.steps("loss") == []


def test_a_timeout_inside_a_step_ends_the_step_and_keeps_its_checkpoint(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    request = make_request(data=NO_VALIDATION, training={"gradient_accumulation_steps": 4})
    reporter = StopsAsTrainingStarts(StopReason.TIMEOUT)
    storage = LocalStorage(tmp_path / "storage")
    store = CheckpointStore(storage, "job", every_steps=2, keep=5)

    with pytest.raises(TrainingStopped) as stopped:
        run_job(request, tmp_path / "work", reporter, settings, store)

    assert stopped.value.reason == StopReason.TIMEOUT and stopped.value.step == 1
    assert reporter.steps("loss") == [1]
    assert [c.step for c in list_checkpoints(storage, "job")] == [1]
