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

from collections.abc import Sequence
from functools import partial
from typing import Any

from shared import loss_mask
from shared.dataset_columns import MESSAGES_COLUMN
from shared.dataset_files import LoadedDataset
from shared.loss_mask import ChatExample, LossMaskError, Turn, in_spans
from worker.pipeline.errors import PipelineError
from worker.pipeline.labels import TokenizedExample, kept_tokens, label_example, text_batches
from worker.pipeline.report import LogFn, no_log


def render_chat(messages: Sequence[Turn], tokenizer: Any) -> ChatExample:
    """Render one conversation with the tokenizer's chat template; the trained spans are its
    assistant turns (`shared.loss_mask.render_chat`). `PipelineError` for a template that
    cannot tell them apart."""
    try:
        return loss_mask.render_chat(messages, partial(_apply, tokenizer))
    except LossMaskError as exc:
        raise PipelineError(str(exc)) from None


def _apply(tokenizer: Any, messages: Sequence[Turn], *, add_generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
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
    """Render every row's `messages` with the tokenizer's chat template, each conversation
    cut by `shared.loss_mask.bound_turns` first. The caller checked that the column exists
    (`shared.dataset_columns`); each row's value is checked here."""
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            "the model's tokenizer has no chat template, which a {messages} prompt_template "
            "needs; use a base model with one or a prompt_template with columns"
        )
    examples = [
        render_chat(
            loss_mask.bound_turns(check_turns(row.get(MESSAGES_COLUMN), n), max_chars,
                                  max_turns),
            tokenizer,
        )
        for n, row in enumerate(dataset.rows, start=1)
    ]
    turns = sum(len(e.trained_spans) for e in examples)
    log(
        f"chat mode: rendered {len(examples)} conversations with the model's chat template; "
        f"loss on {turns} assistant turns"
    )
    return examples


def tokenize_chats(
    examples: Sequence[ChatExample],
    tokenizer: Any,
    cutoff_len: int,
    *,
    train_on_inputs: bool = False,
    log: LogFn = no_log,
) -> list[TokenizedExample]:
    """Tokenize rendered conversations, labels -100 outside the trained spans, cut to
    `cutoff_len`. A conversation with no trained token left is dropped.

    The template writes the special tokens itself (BOS too), so the tokenizer adds none, as
    `apply_chat_template(tokenize=True)` does. Needs a fast tokenizer (character offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise PipelineError("chat mode needs a fast tokenizer (tokenizer.json) for offsets")
    out: list[TokenizedExample] = []
    truncated = dropped = 0
    for batch in text_batches(examples, lambda e: len(e.text)):
        enc = tokenizer(
            [e.text for e in batch], add_special_tokens=False, return_offsets_mapping=True,
            **kept_tokens(cutoff_len),
        )
        for example, ids, offsets in zip(
            batch, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            tokenized, was_cut = label_example(
                ids, in_spans(offsets, example.trained_spans), cutoff_len,
                train_on_inputs=train_on_inputs,
            )
            truncated += was_cut
            if tokenized is None:
                dropped += 1
            else:
                out.append(tokenized)
    log(
        f"tokenized {len(examples)} conversations: {truncated} truncated to cutoff_len "
        f"{cutoff_len}, {dropped} dropped (no assistant token within cutoff_len)"
    )
    if not out:
        raise PipelineError(
            f"no conversation has an assistant token within cutoff_len {cutoff_len}; "
            "raise cutoff_len or add assistant turns"
        )
    return out
