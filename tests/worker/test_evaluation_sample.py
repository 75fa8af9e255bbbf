"""Evaluation reads a fixed, seeded sample of the validation split, sized to a share of the
training compute, the baseline before training included. Real jobs on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.settings import Settings
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.examples import evaluated_sample, split
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job

# The bundled 300 rows, half held out: 150 validation examples, more than a small run should
# evaluate eleven times.
HALF_HELD_OUT = {"data_split_config": {"train": 0.5, "validation": 0.5}}


def settings_for(tmp_path: Path, tiny_model_dir: Path, **values: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data",
                    allowed_local_dirs=[tiny_model_dir.parent, DATASET_PATH.parent], **values)


def test_a_job_evaluates_a_sample_of_its_validation_split_and_says_so(
    tmp_path: Path, tiny_model_dir: Path, make_request: Any
) -> None:
    request = make_request(model={"model_path": str(tiny_model_dir)}, data=HALF_HELD_OUT)
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter,
                     settings_for(tmp_path, tiny_model_dir))

    # 150 train examples at 5% leave room for 2 examples an evaluation: the floor of 32.
    assert result.eval_rows == 32
    assert ("evaluation: 32 of the 150 validation examples, the same seeded sample every time "
            "(all evaluations within 5% of the training compute)") in reporter.lines
    assert result.best_eval_loss is not None


def test_a_job_may_name_its_evaluated_examples(
    tmp_path: Path, tiny_model_dir: Path, make_request: Any
) -> None:
    request = make_request(model={"model_path": str(tiny_model_dir)}, data=HALF_HELD_OUT,
                           training={"max_eval_examples": 5})
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter,
                     settings_for(tmp_path, tiny_model_dir))

    assert result.eval_rows == 5
    assert any(line.endswith("(training_config.max_eval_examples)") for line in reporter.lines)


def test_the_sample_is_the_same_examples_every_time(make_request: Any) -> None:
    config = make_request().training_config
    examples = list(range(1000))
    samples = []
    for _ in range(2):
        _, validation = split(examples, {"train": 0.9, "validation": 0.1})
        samples.append(evaluated_sample(validation, train_examples=900, config=config,
                                        compute_share=0.05))
    assert samples[0] == samples[1]
    assert len(samples[0]) == 32 and samples[0] != list(range(32))  # seeded, not the file's head


def test_a_large_split_is_sampled_up_to_the_cap_and_the_log_says_why() -> None:
    from shared.schema import TrainingConfig

    lines: list[str] = []
    sample = evaluated_sample(list(range(10_000)), train_examples=90_000,
                              config=TrainingConfig(), compute_share=0.05, cap=256,
                              log=lines.append)

    # The share alone would allow 1227 examples: minutes before a CPU's first step.
    assert list(sample) == list(range(256))
    assert lines == ["evaluation: 256 of the 10000 validation examples, the same seeded sample "
                     "every time (at most 256 an evaluation (TUNERY_EVAL_MAX_EXAMPLES), so that "
                     "the baseline evaluation does not hold the first step back)"]
