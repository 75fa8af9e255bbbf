"""Chat mode: rows with a `messages` column of OpenAI-style `{role, content}` turns.

A conversation is rendered with the base model's own chat template (transformers'
`apply_chat_template`, a sandboxed jinja environment), so training sees exactly the format the
model is prompted with at inference. The loss is on the assistant turns only: each turn's
content and the end-of-turn marker the template writes after it (`</s>`, `<|im_end|>`,
`<|eot_id|>`), which is how the model learns to stop. No extra EOS is appended. That rule is
`shared.loss_mask`'s, which the API's token preview applies too; this module feeds it
transformers' tokenizer.

Chat mode is selected by a `prompt_template` that is exactly `{messages}`
(`shared.dataset_columns.is_chat_template`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from shared import loss_mask
from shared.dataset_columns import MESSAGES_COLUMN
from shared.dataset_files import LoadedDataset
from shared.loss_mask import ChatExample, LossMaskError, Turn
from worker.pipeline.errors import PipelineError
from worker.pipeline.labels import (
    BatchEncoder,
    TokenCounts,
    encoded_ahead,
    label_batch,
    text_batches,
)
from worker.pipeline.report import LogFn, no_log
from worker.pipeline.token_store import TokenStore, TokenStoreWriter


def render_chat(
    messages: Sequence[Turn], tokenizer: Any, *, tools: Sequence[Mapping[str, Any]] | None = None
) -> ChatExample:
    """Render one conversation with the tokenizer's chat template (given `tools`, the tool
    definitions the template may write); the trained spans are its assistant turns
    (`shared.loss_mask.render_chat`). `PipelineError` for a template that cannot tell them
    apart."""
    try:
        return loss_mask.render_chat(messages, partial(_apply, tokenizer, tools=tools))
    except LossMaskError as exc:
        raise PipelineError(str(exc)) from None


def _apply(
    tokenizer: Any, messages: Sequence[Turn], *, add_generation_prompt: bool,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    return str(
        tokenizer.apply_chat_template(
            list(messages), tools=list(tools) if tools else None, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    )


def check_turns(value: Any, row_number: int) -> list[Turn]:
    """The row's `messages` as a list of turns; `PipelineError` naming the row otherwise."""
    try:
        return loss_mask.check_turns(value, row_number)
    except LossMaskError as exc:
        raise PipelineError(str(exc)) from None


def render_chats(
    dataset: LoadedDataset,
    tokenizer: Any,
    *,
    max_chars: int | None = None,
    max_turns: int | None = None,
    log: LogFn = no_log,
) -> list[ChatExample]:
    """Every row's `messages` rendered (`RenderedChats`), as a list."""
    chats = RenderedChats(dataset, tokenizer, max_chars=max_chars, max_turns=max_turns)
    examples = list(chats)
    chats.log_rendered(log)
    return examples


class RenderedChats(Iterator[ChatExample]):
    """Render each row's `messages` with the tokenizer's chat template as it is read, each
    conversation cut by `shared.loss_mask.bound_turns` first; counts what it rendered for
    `log_rendered`. The caller checked that the column exists (`shared.dataset_columns`);
    each row's value is checked here."""

    def __init__(self, dataset: LoadedDataset, tokenizer: Any, *, max_chars: int | None = None,
                 max_turns: int | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise PipelineError(
                "the model's tokenizer has no chat template, which a {messages} prompt_template "
                "needs; use a base model with one or a prompt_template with columns"
            )
        self._rows = enumerate(dataset.rows, start=1)
        self._tokenizer, self._max_chars, self._max_turns = tokenizer, max_chars, max_turns
        self.conversations = self.turns = 0

    def __next__(self) -> ChatExample:
        n, row = next(self._rows)
        turns = check_turns(row.get(MESSAGES_COLUMN), n)
        example = render_chat(loss_mask.bound_turns(turns, self._max_chars, self._max_turns),
                              self._tokenizer)
        self.conversations += 1
        self.turns += len(example.trained_spans)
        return example

    def log_rendered(self, log: LogFn) -> None:
        log(
            f"chat mode: rendered {self.conversations} conversations with the model's chat "
            f"template; loss on {self.turns} assistant turns"
        )


def tokenize_chats(
    examples: Iterable[ChatExample],
    tokenizer: Any,
    cutoff_len: int,
    *,
    train_on_inputs: bool = False,
    log: LogFn = no_log,
    directory: Path | None = None,
) -> TokenStore:
    """Tokenize rendered conversations, labels -100 outside the trained spans, cut to
    `cutoff_len`, into a `TokenStore` under `directory` (in memory without one). A
    conversation with no trained token left is dropped. Given `RenderedChats`, it says what
    was rendered first.

    The template writes the special tokens itself (BOS too), so the tokenizer adds none, as
    `apply_chat_template(tokenize=True)` does. Needs a fast tokenizer (character offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise PipelineError("chat mode needs a fast tokenizer (tokenizer.json) for offsets")
    encode = BatchEncoder(tokenizer, cutoff_len, add_special_tokens=False)
    writer = TokenStoreWriter(directory)
    counts = TokenCounts()
    batches = text_batches(examples, lambda e: len(e.text))
    for batch, encoded in encoded_ahead(batches, lambda b: encode([e.text for e in b])):
        offsets = encoded.offsets()
        trained = np.stack([in_spans_row(offsets[i], e.trained_spans)
                            for i, e in enumerate(batch)])
        labelled = label_batch(encoded.ids, trained, encoded.lengths, cutoff_len,
                               train_on_inputs=train_on_inputs, eos_id=None)
        writer.add(labelled.kept)
        counts.add(labelled, len(batch))
    store = writer.finish()
    if isinstance(examples, RenderedChats):
        examples.log_rendered(log)
    log(
        f"tokenized {counts.examples} conversations: {counts.truncated} truncated to "
        f"cutoff_len {cutoff_len}, {counts.dropped} dropped (no assistant token within "
        "cutoff_len)"
    )
    if not len(store):
        raise PipelineError(
            f"no conversation has an assistant token within cutoff_len {cutoff_len}; "
            "raise cutoff_len or add assistant turns"
        )
    return store


def in_spans_row(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """`shared.loss_mask.in_spans` on one row of a padded batch (offsets of shape (width, 2)):
    whether each token overlaps a trained span; padding and special tokens, with empty
    offsets, overlap nothing."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        trained |= (starts < end) & (ends > start)
    return trained
