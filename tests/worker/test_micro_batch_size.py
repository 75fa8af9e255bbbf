"""training_config.micro_batch_size on the tiny model: the examples per micro-batch, and with
gradient accumulation the optimizer steps a run takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from shared.training_plan import optimizer_steps
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job


@pytest.mark.parametrize("group_by_length", [None, False], ids=["length-buckets", "random"])
def test_micro_batches_of_two_with_accumulation_of_three_run_the_planned_steps(
    tmp_path: Path, settings: Settings, make_request: Any, group_by_length: bool | None
) -> None:
    request = make_request(
        data={"data_split_config": {"train": 0.08, "validation": 0.0}},
        training={"micro_batch_size": 2, "gradient_accumulation_steps": 3,
                  "lr_scheduler_type": "constant", "group_by_length": group_by_length},
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    # 24 examples: 12 micro-batches of 2, 3 of them an optimizer step. Batches of the default 4
    # would make 6 micro-batches, 2 steps.
    assert result.train_rows == 24
    assert result.steps == 4 == optimizer_steps(24, epochs=1, gradient_accumulation_steps=3,
                                                batch_size=2)
    assert len(reporter.values("loss")) == 4
    assert any("batch 2 x 3" in line for line in reporter.lines)
    if group_by_length is None:
        assert any("length-bucketed" in line and "12 per epoch" in line
                   for line in reporter.lines)
