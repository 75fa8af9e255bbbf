"""One eval for every recipe: mean cross-entropy over the response tokens of the held-out set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bench.common.datasets import IGNORE_INDEX, Example

EVAL_BATCH_SIZE = 4


def pad_batch(examples: Sequence[Example], pad_token_id: int, width: int | None = None
              ) -> dict[str, torch.Tensor]:
    """Right-pad to `width` (default: the longest): pad id / attention 0 / label -100."""
    width = width or max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@torch.no_grad()
def response_loss(model: Any, examples: Sequence[Example], pad_token_id: int) -> float:
    """Token-weighted mean loss on the response tokens, in the examples' order, batches of
    `EVAL_BATCH_SIZE` padded to their longest, eval mode (no dropout). The same number for the
    same adapter whatever recipe trained it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), EVAL_BATCH_SIZE):
        batch = pad_batch(examples[start : start + EVAL_BATCH_SIZE], pad_token_id)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.float()
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)
