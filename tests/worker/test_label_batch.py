"""`label_batch` labels a whole padded batch exactly as `shared.loss_mask` labels one example:
the batch form the worker trains with against the one-example rule the API previews with."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shared.loss_mask import label_example, with_trained_eos
from worker.pipeline.labels import label_batch, padded

EOS = 2


def one_by_one(rows: list[tuple[list[int], list[bool]]], cutoff: int, *, train_on_inputs: bool,
               eos: int | None) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    kept, truncated, dropped = [], 0, 0
    for ids, trained in rows:
        if eos is not None:
            ids, trained = with_trained_eos(ids, trained, eos)
        example, was_cut = label_example(ids, trained, cutoff, train_on_inputs=train_on_inputs)
        truncated += was_cut
        if example is None:
            dropped += 1
        else:
            kept.append((example.input_ids, example.labels))
    return kept, truncated, dropped


def batched(rows: list[tuple[list[int], list[bool]]], cutoff: int, *, train_on_inputs: bool,
            eos: int | None) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    ids = padded([r[0] for r in rows], 0, np.int64)
    trained = padded([r[1] for r in rows], False, bool)
    lengths = np.array([len(r[0]) for r in rows])
    result = label_batch(ids, trained, lengths, cutoff, train_on_inputs=train_on_inputs,
                         eos_id=eos)
    kept, start = [], 0
    for length in result.kept.lengths.tolist():
        row_ids = result.kept.ids[start:start + length]
        row_trained = result.kept.trained[start:start + length]
        kept.append((row_ids.tolist(), np.where(row_trained, row_ids, -100).tolist()))
        start += length
    return kept, result.truncated, result.dropped


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("eos", [EOS, None])
def test_a_batch_is_labelled_as_each_example_alone(train_on_inputs: bool, eos: int | None) -> None:
    rng = random.Random(7)
    for cutoff in (1, 2, 5, 8, 13):
        rows = []
        for _ in range(200):
            # Lengths around the cutoff (cut, exactly full, one short), ids that end in EOS or
            # not, prompts with no trained token, all trained tokens past the cutoff.
            length = rng.choice([0, 1, cutoff - 1, cutoff, cutoff + 1, rng.randint(1, 20)])
            length = max(length, 0 if eos is not None else 1)
            ids = [rng.choice([EOS, 5, 6, 7, 300]) for _ in range(length)]
            boundary = rng.randint(0, length + 1)
            trained = [i >= boundary for i in range(length)]
            rows.append((ids, trained))

        expected = one_by_one(rows, cutoff, train_on_inputs=train_on_inputs, eos=eos)
        got = batched(rows, cutoff, train_on_inputs=train_on_inputs, eos=eos)

        assert got == expected, f"cutoff {cutoff}"
