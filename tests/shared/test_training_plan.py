"""The step count and the warm-up rule the preflight and the worker share."""

from __future__ import annotations

import pytest

from shared.training_plan import (
    BATCH_SIZE,
    WARMUP_CAPPED_SHARE,
    evaluation_examples,
    micro_batch_size,
    optimizer_steps,
    split_sizes,
    warmup_plan,
)


@pytest.mark.parametrize(("examples", "epochs", "accumulation", "steps"), [
    (0, 1, 1, 0),
    (1, 1, 1, 1),
    (2, 1, 1, 1),
    (44, 1, 1, 11),
    (45, 1, 1, 12),
    (44, 2, 1, 22),
    (44, 1, 4, 3),
    (44, 0.5, 1, 6),
])
def test_optimizer_steps_count_partial_batches_and_accumulations(
        examples: int, epochs: float, accumulation: int, steps: int) -> None:
    assert optimizer_steps(examples, epochs=epochs,
                           gradient_accumulation_steps=accumulation) == steps


def test_micro_batch_size_is_the_jobs_or_four_and_sets_the_steps() -> None:
    assert micro_batch_size(None) == BATCH_SIZE == 4
    assert micro_batch_size(2) == 2
    # 44 examples: 22 micro-batches of 2; 3 of them a step, the last step takes the one left.
    assert optimizer_steps(44, epochs=1, gradient_accumulation_steps=3, batch_size=2) == 8


def test_the_default_warmup_on_an_eleven_step_run_is_capped_and_says_so() -> None:
    plan = warmup_plan(50, 11)
    assert plan.steps == int(11 * WARMUP_CAPPED_SHARE) == 1
    assert plan.capped
    assert plan.warning is not None
    assert "from 50 to 1" in plan.warning and "longer than the run's 11" in plan.warning


def test_a_one_step_run_trains_at_the_full_rate_and_says_why() -> None:
    plan = warmup_plan(50, 1)
    assert plan.steps == 0 and plan.capped
    assert plan.warning is not None and plan.warning.endswith(
        "cut to 10% of them, rounded down: none for a run this short, which trains at "
        "learning_rate from its first step")


def test_a_large_share_is_kept_with_a_warning_and_a_small_one_silently() -> None:
    kept = warmup_plan(30, 100)
    assert kept.steps == 30 and not kept.capped
    assert kept.warning is not None and "30%" in kept.warning
    assert warmup_plan(10, 100).warning is None
    assert warmup_plan(50, 100).capped  # half the run: cut


@pytest.mark.parametrize(("examples", "split", "expected"), [
    (40, {"train": 0.9, "validation": 0.1}, (36, 4)),
    (2, {"train": 0.9, "validation": 0.1}, (1, 1)),
    (1, {"train": 0.9, "validation": 0.1}, (1, 0)),
    (10, {"train": 0.5, "validation": 0.0}, (5, 0)),
    (0, {"train": 0.9, "validation": 0.1}, (0, 0)),
])
def test_split_sizes_leave_only_an_empty_dataset_without_training_examples(
    examples: int, split: dict[str, float], expected: tuple[int, int]
) -> None:
    assert split_sizes(examples, split) == expected


@pytest.mark.parametrize(("validation", "train", "epochs", "share", "most", "evaluated"), [
    # Ten thousand rows split 90/10: 11 evaluations of 122 examples cost 5% of an epoch.
    (1000, 9000, 1, 0.05, None, 122),
    (10_000, 90_000, 1, 0.05, None, 1227),
    (10_000, 90_000, 3, 0.05, None, 3681),
    # Small splits: at least 32, and never more than the split holds.
    (150, 150, 1, 0.05, None, 32),
    (30, 270, 1, 0.05, None, 30),
    (0, 270, 1, 0.05, None, 0),
    # The operator's share and the job's own number.
    (1000, 9000, 1, 0.5, None, 1000),
    (1000, 9000, 1, 0.05, 500, 500),
    (100, 9000, 1, 0.05, 500, 100),
])
def test_evaluation_reads_a_sample_sized_to_a_share_of_the_training_compute(
        validation: int, train: int, epochs: float, share: float, most: int | None,
        evaluated: int) -> None:
    assert evaluation_examples(validation, train, epochs=epochs, compute_share=share,
                               max_examples=most, cap=1_000_000) == evaluated


@pytest.mark.parametrize(("validation", "train", "most", "evaluated"), [
    # The share would allow 1227: the baseline before the first step reads 256.
    (10_000, 90_000, None, 256),
    (1000, 9000, None, 122),
    (150, 150, None, 32),
    # The job's own number is its own.
    (10_000, 90_000, 2000, 2000),
])
def test_an_evaluation_reads_at_most_the_operators_cap(
        validation: int, train: int, most: int | None, evaluated: int) -> None:
    assert evaluation_examples(validation, train, epochs=1, compute_share=0.05,
                               max_examples=most) == evaluated
