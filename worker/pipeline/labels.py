"""Token ids and their labels: what supervised and chat examples both become.

Which tokens are trained, and the labels that say so, is `shared.loss_mask`'s rule, shared
with the API's token preview; its names are re-exported here for the pipeline's stages. This
module adds how texts are handed to transformers' tokenizer (in bounded batches, each kept to
what cutoff_len can use) and `label_batch`, the same rule on a whole batch at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeVar

import numpy as np

from shared.loss_mask import IGNORE_INDEX, TokenizedExample, label_example
from worker.pipeline.token_store import TokenBatch

__all__ = [
    "IGNORE_INDEX",
    "BatchEncoder",
    "EncodedBatch",
    "LabelledBatch",
    "TOKENIZE_BATCH_CHARS",
    "TOKENIZE_BATCH_EXAMPLES",
    "TokenCounts",
    "TokenizedExample",
    "encoded_ahead",
    "kept_tokens",
    "label_batch",
    "label_example",
    "padded",
    "text_batches",
]

Item = TypeVar("Item")
Batch = TypeVar("Batch")
Encoded = TypeVar("Encoded")


# Characters handed to the tokenizer at once. The tokenizer holds every token of a batch, with
# its offsets, before anything is cut to cutoff_len; a batch bounded by examples alone could
# hold a thousand examples each as long as the render bound allows.
TOKENIZE_BATCH_CHARS = 1_000_000
TOKENIZE_BATCH_EXAMPLES = 1000


def text_batches(items: Iterable[Item], length: Callable[[Item], int]) -> Iterator[list[Item]]:
    """`items` in order, in batches of at most TOKENIZE_BATCH_EXAMPLES items and
    TOKENIZE_BATCH_CHARS characters (`length` of each), one item at least. Reads `items` once,
    as it goes: a generator of rendered examples is never held whole."""
    batch: list[Item] = []
    chars = 0
    for item in items:
        size = length(item)
        if batch and (len(batch) >= TOKENIZE_BATCH_EXAMPLES or chars + size > TOKENIZE_BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(item)
        chars += size
    if batch:
        yield batch


def encoded_ahead(
    batches: Iterable[Batch], encode: Callable[[Batch], Encoded]
) -> Iterator[tuple[Batch, Encoded]]:
    """Each batch with `encode(batch)`, the next batch being encoded in a thread meanwhile.

    The tokenizer's Rust core releases the GIL while it encodes (on every core), so reading,
    rendering and labelling one batch in Python overlap the encoding of the next, instead of
    each waiting for the other. One batch ahead at most: memory stays at two batches.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as pool:
        ahead: deque[tuple[Batch, Future[Encoded]]] = deque()
        for batch in batches:
            ahead.append((batch, pool.submit(encode, batch)))
            if len(ahead) > 1:
                done, future = ahead.popleft()
                yield done, future.result()
        while ahead:
            done, future = ahead.popleft()
            yield done, future.result()


def kept_tokens(cutoff_len: int) -> dict[str, Any]:
    """Tokenizer arguments that keep cutoff_len + 1 tokens of each text: the first cutoff_len
    are the same as without them, and the one more tells `label_example` that the text was cut.
    Nothing past it is ever turned into Python lists."""
    return {"truncation": True, "max_length": cutoff_len + 1}


@dataclass(frozen=True)
class EncodedBatch:
    """A batch of texts tokenized: ids right-padded to the longest row (shape (rows, width)),
    each row's token count, and the tokenizer's encodings for what else is asked."""

    encodings: list[Any]
    ids: np.ndarray
    lengths: np.ndarray
    trailing_special: int

    def offsets(self) -> np.ndarray:
        """Each token's character offsets, shape (rows, width, 2); (0, 0) for padding."""
        out = np.zeros((*self.ids.shape, 2), dtype=np.int64)
        for row, encoding in enumerate(self.encodings):
            out[row, : self.lengths[row]] = encoding.offsets
        return out

    def ending_after(self, chars: Sequence[int]) -> np.ndarray:
        """`shared.loss_mask.after_prompt` on every row (whether each token ends past the
        row's first `chars[row]` characters), shape (rows, width).

        Tokens come in text order, so they are those from the one holding character
        `chars[row]` on, less the special tokens the tokenizer appends (offsets (0, 0)); one
        lookup a row instead of every token's offsets as Python tuples. A row whose
        character is held by no token (a completion that is empty or cut off) is read from
        its offsets."""
        rows, width = self.ids.shape
        column = np.arange(width)
        out = np.zeros((rows, width), dtype=bool)
        for row, (encoding, prompt_chars) in enumerate(zip(self.encodings, chars, strict=True)):
            first = encoding.char_to_token(prompt_chars)
            if first is None:
                out[row, : len(encoding.offsets)] = [
                    end > prompt_chars for _start, end in encoding.offsets]
                continue
            end = self.lengths[row] - self.trailing_special
            out[row] = (column >= first) & (column < end)
        return out


class BatchEncoder:
    """A fast tokenizer's Rust core, called directly: texts to numpy arrays, each text cut to
    cutoff_len + 1 tokens (`kept_tokens`).

    The same tokens and offsets as calling the tokenizer with `kept_tokens`, right-padded
    with zeros here (the lengths say where each example ends). transformers' call converts
    every token and offset into Python lists first, which cost more than the tokenization
    itself. A copy of the core, so the truncation set here never reaches the tokenizer the
    rest of the job uses.
    """

    def __init__(self, tokenizer: Any, cutoff_len: int, *, add_special_tokens: bool) -> None:
        from tokenizers import Tokenizer

        core = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.core, self.add_special_tokens = core, add_special_tokens
        # What the post-processor appends after the text (Llama: nothing; BERT: [SEP]); it
        # is kept through truncation, always the same count.
        probe = core.encode("a", add_special_tokens=add_special_tokens).special_tokens_mask
        self.trailing_special = len(probe) - 1 - max(
            i for i, special in enumerate(probe) if not special)
        core.enable_truncation(cutoff_len + 1, direction=tokenizer.truncation_side)
        core.no_padding()

    def __call__(self, texts: list[str]) -> EncodedBatch:
        encodings = self.core.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        tokens = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64,
                             count=int(lengths.sum()))
        ids = np.zeros((len(encodings), int(lengths.max(initial=0))), dtype=np.int64)
        ids[np.arange(ids.shape[1]) < lengths[:, None]] = tokens
        return EncodedBatch(encodings=encodings, ids=ids, lengths=lengths,
                            trailing_special=self.trailing_special)


@dataclass(frozen=True)
class LabelledBatch:
    """A tokenizer batch after `label_batch`: the examples kept, and how many of the batch
    were cut to cutoff_len or dropped."""

    kept: TokenBatch
    truncated: int
    dropped: int


@dataclass
class TokenCounts:
    """What the batches of one dataset's tokenizing cut and dropped, summed."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    def add(self, batch: LabelledBatch, examples: int) -> None:
        self.examples += examples
        self.truncated += batch.truncated
        self.dropped += batch.dropped


def label_batch(
    ids: np.ndarray,
    trained: np.ndarray,
    lengths: np.ndarray,
    cutoff_len: int,
    *,
    train_on_inputs: bool,
    eos_id: int | None,
) -> LabelledBatch:
    """`label_example` (after `with_trained_eos` when `eos_id` is given) on every row of a
    right-padded batch at once: `ids` and `trained` of shape (rows, width), `lengths` the
    real tokens of each row; a row left with no token at all is dropped. In numpy, because at
    a million examples a Python loop over tokens took longer than the tokenizer itself.
    `tests/worker/test_label_batch.py` holds it to the one-example rule of
    `shared.loss_mask`."""
    rows = len(lengths)
    lengths = lengths.astype(np.int64)
    if eos_id is not None:
        # One more column: an EOS appended after the longest row.
        ids = np.concatenate([ids, np.zeros((rows, 1), ids.dtype)], axis=1)
        trained = np.concatenate([trained, np.zeros((rows, 1), bool)], axis=1)
        row = np.arange(rows)
        last = np.maximum(lengths - 1, 0)
        ends_in_eos = (lengths > 0) & (ids[row, last] == eos_id)
        trained[row[ends_in_eos], last[ends_in_eos]] = True
        appended = ~ends_in_eos
        ids[row[appended], lengths[appended]] = eos_id
        trained[row[appended], lengths[appended]] = True
        lengths = lengths + appended
    cut = lengths > cutoff_len
    lengths = np.minimum(lengths, cutoff_len)
    inside = np.arange(ids.shape[1]) < lengths[:, None]
    trained = inside if train_on_inputs else trained.astype(bool) & inside
    keep = (lengths > 0) & trained.any(axis=1)
    chosen = inside & keep[:, None]
    kept = TokenBatch(ids[chosen], trained[chosen], lengths[keep])
    return LabelledBatch(kept, truncated=int(cut.sum()), dropped=int(rows - keep.sum()))


def padded(rows: Sequence[Sequence[Any]], fill: Any, dtype: Any) -> np.ndarray:
    """`rows` of different lengths as one (rows, longest) array, right-padded with `fill`."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
