"""Token ids and their labels: what supervised and chat examples both become.

Which tokens are trained, and the labels that say so, is `shared.loss_mask`'s rule, shared
with the API's token preview; its names are re-exported here for the pipeline's stages. This
module adds how texts are handed to transformers' tokenizer: in bounded batches, each kept to
what cutoff_len can use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from shared.loss_mask import IGNORE_INDEX, TokenizedExample, label_example

__all__ = [
    "IGNORE_INDEX",
    "TOKENIZE_BATCH_CHARS",
    "TOKENIZE_BATCH_EXAMPLES",
    "TokenizedExample",
    "kept_tokens",
    "label_example",
    "text_batches",
]

Item = TypeVar("Item")


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
