"""Token ids and their labels: what supervised and chat examples both become.

Labels are -100 (`IGNORE_INDEX`, ignored by the loss) on tokens the model is not trained to
write. Prompt-template examples (`worker.pipeline.examples`) and chat examples
(`worker.pipeline.chat`) compute which tokens are trained their own way and label them here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

Item = TypeVar("Item")

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def label_example(
    ids: Sequence[int], trained: Sequence[bool], cutoff_len: int, *, train_on_inputs: bool
) -> tuple[TokenizedExample | None, bool]:
    """Cut `ids` to `cutoff_len` and label them: -100 where `trained` is False, or every token
    with `train_on_inputs`. Returns (example, whether it was cut); the example is None when no
    trained token is left."""
    was_cut = len(ids) > cutoff_len
    ids, trained = list(ids[:cutoff_len]), trained[:cutoff_len]
    if train_on_inputs:
        return TokenizedExample(ids, list(ids)), was_cut
    if not any(trained):
        return None, was_cut
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    return TokenizedExample(ids, labels), was_cut


# Characters handed to the tokenizer at once. The tokenizer holds every token of a batch, with
# its offsets, before anything is cut to cutoff_len; a batch bounded by examples alone could
# hold a thousand examples each as long as the render bound allows.
TOKENIZE_BATCH_CHARS = 1_000_000
TOKENIZE_BATCH_EXAMPLES = 1000


def text_batches(items: Sequence[Item], length: Callable[[Item], int]) -> Iterator[Sequence[Item]]:
    """`items` in order, in batches of at most TOKENIZE_BATCH_EXAMPLES items and
    TOKENIZE_BATCH_CHARS characters (`length` of each), one item at least."""
    start = 0
    while start < len(items):
        end, chars = start, 0
        while end < len(items) and end - start < TOKENIZE_BATCH_EXAMPLES:
            chars += length(items[end])
            if chars > TOKENIZE_BATCH_CHARS and end > start:
                break
            end += 1
        yield items[start:end]
        start = end


def kept_tokens(cutoff_len: int) -> dict[str, Any]:
    """Tokenizer arguments that keep cutoff_len + 1 tokens of each text: the first cutoff_len
    are the same as without them, and the one more tells `label_example` that the text was cut.
    Nothing past it is ever turned into Python lists."""
    return {"truncation": True, "max_length": cutoff_len + 1}
