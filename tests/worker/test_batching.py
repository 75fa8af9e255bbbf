"""Training batch layouts: length buckets under a token budget, and padding that changes no
example's losses."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from worker.pipeline.batching import (
    ExampleDataset,
    LengthBucketBatches,
    PadToLongest,
    choose_layout,
)
from worker.pipeline.labels import IGNORE_INDEX, TokenizedExample
from worker.pipeline.model import attention_implementation
from worker.pipeline.trainer import TuneryTrainer


def _lengths(count: int = 103, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    # Short instruction data: mostly 30-70 tokens, a long tail.
    return [min(150, max(8, int(rng.lognormvariate(3.9, 0.35)))) for _ in range(count)]


def _epoch(batches: LengthBucketBatches, epoch: int) -> list[list[int]]:
    batches.set_epoch(epoch)
    return list(batches)


def test_batches_stay_under_the_token_budget_and_hold_every_example_once_per_epoch() -> None:
    lengths = _lengths()
    batches = LengthBucketBatches(lengths, batch_size=4, seed=42)

    for epoch in range(3):
        epoch_batches = _epoch(batches, epoch)
        assert sorted(i for batch in epoch_batches for i in batch) == list(range(len(lengths)))
        for batch in epoch_batches:
            assert len(batch) * max(lengths[i] for i in batch) <= batches.token_budget


def test_an_epoch_has_as_many_batches_as_fixed_batches_of_the_batch_size() -> None:
    for count, batch_size in [(103, 4), (24, 4), (7, 4), (1, 4), (50, 1), (64, 16)]:
        lengths = _lengths(count, seed=count)
        batches = LengthBucketBatches(lengths, batch_size=batch_size, seed=42)

        assert len(batches) == len(_epoch(batches, 0)) == math.ceil(count / batch_size)
        # Fixed batches are one way to fit, so the budget never exceeds their largest.
        assert batches.token_budget <= min(batch_size, count) * max(lengths)


def test_length_buckets_pad_far_less_than_random_batches() -> None:
    lengths = _lengths(1000)
    batches = LengthBucketBatches(lengths, batch_size=4, seed=42)
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    random_padded = sum(
        4 * max(lengths[i] for i in shuffled[s : s + 4]) for s in range(0, len(lengths), 4)
    )

    assert batches.padding_share() < 0.02 < 1 - sum(lengths) / random_padded


def test_the_same_seed_and_epoch_give_the_same_batches_and_another_epoch_another_order() -> None:
    lengths = _lengths()
    first = LengthBucketBatches(lengths, batch_size=4, seed=42)
    second = LengthBucketBatches(lengths, batch_size=4, seed=42)

    # Replayed out of order, as a resumed run does.
    assert _epoch(first, 1) == _epoch(second, 1)
    assert _epoch(first, 0) == _epoch(second, 0)
    assert _epoch(first, 0) != _epoch(first, 1)
    assert _epoch(first, 0) != _epoch(LengthBucketBatches(lengths, batch_size=4, seed=7), 0)


def _examples(lengths: list[int]) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(3)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 900, (n,), generator=generator).tolist()
        prompt = n // 3
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append(TokenizedExample(input_ids=ids, labels=labels))
    return examples


def _token_losses(model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's per-token losses at its labelled positions."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return [row[target != IGNORE_INDEX] for row, target in zip(losses, targets, strict=True)]


def test_padded_batch_gives_each_example_the_losses_it_has_alone(tiny_lora: Any) -> None:
    # The attention the worker trains with on this machine.
    assert tiny_lora.config._attn_implementation == attention_implementation(torch.float32)
    examples = _examples([37, 9, 22, 37, 5])
    collate = PadToLongest(pad_token_id=0)

    together = _token_losses(tiny_lora, collate(examples))
    for example, losses in zip(examples, together, strict=True):
        (alone,) = _token_losses(tiny_lora, collate([example]))
        assert len(alone) == len(losses) > 0
        torch.testing.assert_close(losses, alone, atol=1e-4, rtol=0)


def test_group_by_length_chooses_length_buckets_without_variable_length_attention(
    tiny_lora: Any,
) -> None:
    assert choose_layout(tiny_lora, group_by_length=True) == "length_buckets"
    assert choose_layout(tiny_lora, group_by_length=False) == "fixed_size"
    # Left out of the request: the worker's choice.
    assert choose_layout(tiny_lora, group_by_length=None) == "length_buckets"


def test_trainer_trains_on_the_bucketed_batches_and_skips_them_on_resume(
    tiny_lora: Any, tmp_path: Path
) -> None:
    from accelerate import skip_first_batches
    from transformers import TrainingArguments

    lengths = _lengths(30)
    examples = _examples(lengths)
    batches = LengthBucketBatches(lengths, batch_size=4, seed=42)
    trainer = TuneryTrainer(
        model=tiny_lora,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        train_dataset=ExampleDataset(examples),
        data_collator=PadToLongest(pad_token_id=0),
        train_batches=batches,
    )
    loader = trainer.get_train_dataloader()
    expected = _epoch(LengthBucketBatches(lengths, batch_size=4, seed=42), 1)

    assert len(loader) == len(expected)
    loader.set_epoch(1)  # what the Trainer does before each epoch
    widths = [batch["input_ids"].shape for batch in loader]
    assert widths == [(len(b), max(lengths[i] for i in b)) for b in expected]
    # A resumed run skips the batches already trained, as the Trainer does with accelerate.
    resumed = skip_first_batches(loader, 3)
    resumed.set_epoch(1)
    assert [batch["input_ids"].shape for batch in resumed] == widths[3:]


def test_batches_are_the_length_order_cut_as_planned_then_shuffled() -> None:
    """The rule a resumed attempt replays: examples longest first, ties in a seeded shuffle,
    cut into the planned batch sizes, the batches shuffled with the same generator."""
    draw = random.Random(5)
    lengths = [draw.randint(1, 40) for _ in range(997)]
    sampler = LengthBucketBatches(lengths, batch_size=8, seed=11)
    sampler.set_epoch(3)

    rng = random.Random(11 * 1_000_003 + 3)
    tie_break = list(range(len(lengths)))
    rng.shuffle(tie_break)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie_break[i]))
    expected, start = [], 0
    for rows in sampler.batch_rows:
        expected.append(order[start:start + rows])
        start += rows
    rng.shuffle(expected)

    assert list(sampler) == expected
