"""Which training examples share a batch, and how they share it.

Three layouts, chosen from the request (`data_config.packing`,
`training_config.group_by_length`) and the attention kernel the model runs:

- `padding_free` (`packing` true, or left out where the model runs flash-attention, see
  `model.attention_implementation`): the examples of a batch are concatenated into one row
  with restarting position ids and cumulative sequence lengths (transformers'
  `DataCollatorWithFlattening`): each example attends only to its own tokens, and there is
  no padding at all, so length grouping has nothing to save. Batches are the Trainer's usual
  random `batch_size` examples. flash-attention's variable-length kernel and Tunery's CPU
  attention (`cpu_attention`) read the sequence lengths and compute each example alone;
  SDPA and eager attention get transformers' block-diagonal mask built from the position ids.
- `length_buckets` (`group_by_length` true or left out, no packing): padded batches of
  examples of about the same length, `LengthBucketBatches`. Each row is one example, padded
  on the right with attention mask 0, so no example attends to another.
- `fixed_size` (`group_by_length` false): the Trainer's random batches of `batch_size`
  examples, padded to the longest; what the request asked for, at the cost of padding.

Left to the worker, CPUs train length-grouped padded batches, the layout
`bench/train_throughput.py` measures; `packing: true` asks for packed rows there too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from worker.pipeline.labels import IGNORE_INDEX, TokenizedExample

BatchLayout = Literal["padding_free", "length_buckets", "fixed_size"]


def varlen_attention(model: Any) -> bool:
    """Whether `model` runs an attention kernel that takes variable-length rows."""
    implementation = getattr(model.config, "_attn_implementation", None) or ""
    return implementation.startswith("flash_attention")


def choose_layout(model: Any, *, group_by_length: bool | None,
                  packing: bool | None = None) -> BatchLayout:
    """`group_by_length` or `packing` None: the request left it to the worker."""
    if packing or (packing is None and varlen_attention(model)):
        return "padding_free"
    return "fixed_size" if group_by_length is False else "length_buckets"


def flattening_collator() -> Any:
    """Padding-free batches: one row, position ids restarting at each example, the first
    label of each example -100 so that no example predicts the next one's first token."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=True)


def padded_tokens(rows: int, longest: int) -> int:
    return rows * longest


class LengthBucketBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of examples of about the same length, under a token budget, in a seeded order.

    Examples sorted by length (ties broken by a seeded shuffle that changes every epoch) are cut
    into consecutive batches such that rows x longest row <= `token_budget`: a batch of short
    examples holds many, a batch of long ones few, and padding stays at the length differences
    within a batch. The batch order is shuffled with `seed` and the epoch.

    The budget is fair to the request's batch size: it is the smallest budget with which the
    examples fit into as many batches as fixed batches of `batch_size` would make, so an epoch
    has the same number of batches, of optimizer steps (with the same gradient accumulation)
    and the same learning-rate schedule, and a step sees `batch_size` x accumulation examples on
    average. Since fixed batches of `batch_size` are one way to fit, the budget is never more
    than `batch_size` x the longest example: no batch is larger in tokens than the largest
    padded fixed-size batch. Each batch holds about the same number of tokens, so every token
    weighs about the same in the mean loss of its step.

    The batches depend only on the lengths, `seed` and the epoch (`set_epoch`, called by the
    Trainer before each epoch, also after a resume), so a resumed run replays the same batches.
    """

    def __init__(self, lengths: Sequence[int], *, batch_size: int, seed: int) -> None:
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths = list(lengths)
        self.seed = seed
        self.epoch = 0
        longest_first = sorted(self.lengths, reverse=True)
        batch_count = math.ceil(len(self.lengths) / batch_size)
        self.token_budget = smallest_budget(longest_first, batch_count, batch_size)
        self.batch_rows = exactly(batch_count, rows_under_budget(longest_first, self.token_budget))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batch_rows)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        tie_break = list(range(len(self.lengths)))
        rng.shuffle(tie_break)
        # Longest first, ties in the shuffled order; numpy's sort, since sorting a million
        # Python tuples took seconds and a hundred megabytes before each epoch.
        order = np.lexsort((np.asarray(tie_break), -np.asarray(self.lengths)))
        cuts = np.cumsum(self.batch_rows)[:-1]
        batches = [batch.tolist() for batch in np.split(order, cuts)]
        rng.shuffle(batches)
        return iter(batches)

    def shapes(self) -> list[tuple[int, int]]:
        """(rows, longest row) of each batch, the same every epoch."""
        longest_first = sorted(self.lengths, reverse=True)
        shapes, start = [], 0
        for rows in self.batch_rows:
            shapes.append((rows, longest_first[start]))
            start += rows
        return shapes

    def padding_share(self) -> float:
        """The fraction of the batches' tokens that are padding (the same every epoch)."""
        padded = sum(padded_tokens(rows, longest) for rows, longest in self.shapes())
        return 1 - sum(self.lengths) / padded


def rows_under_budget(longest_first: Sequence[int], budget: int) -> list[int]:
    """Row counts of consecutive batches of the length-sorted (longest first) examples, each
    batch as full as `budget` allows; the fewest batches any cut into consecutive batches
    can have under that budget."""
    rows: list[int] = []
    start = 0
    while start < len(longest_first):
        # Longest first: the batch's first example is its longest row.
        count = max(1, min(len(longest_first) - start, budget // longest_first[start]))
        rows.append(count)
        start += count
    return rows


def smallest_budget(longest_first: Sequence[int], batch_count: int, batch_size: int) -> int:
    """The smallest token budget with which the examples fit into `batch_count` batches."""
    low = longest_first[0]
    high = padded_tokens(min(batch_size, len(longest_first)), longest_first[0])
    while low < high:
        middle = (low + high) // 2
        if len(rows_under_budget(longest_first, middle)) <= batch_count:
            high = middle
        else:
            low = middle + 1
    return low


def exactly(batch_count: int, rows: list[int]) -> list[int]:
    """`rows` split until there are `batch_count` batches: the smallest budget can fit the
    examples into fewer, and the step count must not change. Halving a batch keeps it under
    the budget."""
    rows = list(rows)
    while len(rows) < batch_count:
        largest = max(range(len(rows)), key=lambda i: rows[i])
        half = rows[largest] // 2
        rows[largest : largest + 1] = [rows[largest] - half, half]
    return rows


class PadToLongest:
    """Pads a batch to its longest example: pad id / attention 0 / label -100."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[TokenizedExample | dict[str, Any]]) -> dict[str, Any]:
        rows = [b if isinstance(b, dict) else vars(b) for b in batch]
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class ExampleDataset(torch.utils.data.Dataset):
    """Items as dicts: the Trainer's length-grouped sampler reads `item["input_ids"]`."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}
