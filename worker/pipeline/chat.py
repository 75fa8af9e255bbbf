"""Chat mode: rows with a `messages` column of OpenAI-style `{role, content}` turns.

A conversation is rendered with the base model's own chat template (transformers'
`apply_chat_template`, a sandboxed jinja environment), so training sees exactly the format the
model is prompted with at inference. The loss is on the assistant turns only: each turn's
content and the end-of-turn marker the template writes after it (`</s>`, `<|im_end|>`,
`<|eot_id|>`), which is how the model learns to stop. No extra EOS is appended.

Chat mode is selected by a `prompt_template` that is exactly `{messages}`
(`shared.dataset_columns.is_chat_template`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.dataset_columns import MESSAGES_COLUMN
from shared.dataset_files import LoadedDataset
from worker.pipeline.errors import PipelineError
from worker.pipeline.labels import TokenizedExample, kept_tokens, label_example, text_batches
from worker.pipeline.report import LogFn, no_log

Turn = Mapping[str, Any]

@dataclass(frozen=True)
class ChatExample:
    """One rendered conversation and the character ranges of `text` the loss is computed on."""

    text: str
    trained_spans: tuple[tuple[int, int], ...]


def render_chat(messages: Sequence[Turn], tokenizer: Any) -> ChatExample:
    """Render one conversation; the trained spans are its assistant turns.

    An assistant turn's span is what rendering it adds after the generation prompt of the
    conversation so far, minus trailing whitespace (the newline after `</s>` is never
    generated, so it is not trained). That only works for templates that render a prefix of a
    conversation as a prefix of its text; any other template is refused with `PipelineError`.
    """
    text = _apply(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        through = _apply(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise PipelineError(
                "the model's chat template does not render a conversation's first turns as the "
                "start of the whole conversation, so the assistant turns cannot be located; "
                "use a prompt_template with columns instead of {messages}"
            )
        spans.append((len(before), len(through.rstrip())))
    return ChatExample(text, tuple(spans))


def _apply(tokenizer: Any, messages: Sequence[Turn], *, add_generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    )


def check_turns(value: Any, row_number: int) -> list[Turn]:
    """The row's `messages` as a list of turns; `PipelineError` naming the row otherwise."""
    if isinstance(value, list | tuple) and value:
        turns = list(value)
        if all(
            isinstance(t, Mapping)
            and isinstance(t.get("role"), str)
            and isinstance(t.get("content"), str)
            for t in turns
        ):
            return turns
    raise PipelineError(
        f"row {row_number}: {MESSAGES_COLUMN} must be a non-empty list of "
        f'{{"role": ..., "content": ...}} objects with string values, got {str(value)[:200]!r}'
    )


def bound_turns(
    turns: Sequence[Turn], max_chars: int | None, max_turns: int | None
) -> list[Turn]:
    """The turns tokenization can reach: at most `max_turns`, their contents cut once they
    add up to `max_chars` characters, later turns left out.

    Every chat template writes at least one token per turn (its role marker), so turns past
    cutoff_len tokens, or past the characters that many tokens can hold, are never trained;
    leaving them out bounds both the rendered text and the prefix renders per assistant turn.
    """
    kept: list[Turn] = []
    left = max_chars
    for turn in turns[:max_turns]:
        if left is not None and left <= 0:
            break
        content = turn["content"]
        if left is not None and len(content) > left:
            turn = {**turn, "content": content[:left]}
        kept.append(turn)
        if left is not None:
            left -= len(content)
    return kept


def render_chats(
    dataset: LoadedDataset,
    tokenizer: Any,
    *,
    max_chars: int | None = None,
    max_turns: int | None = None,
    log: LogFn = no_log,
) -> list[ChatExample]:
    """Render every row's `messages` with the tokenizer's chat template, each conversation
    cut by `bound_turns` first. The caller checked that the column exists
    (`shared.dataset_columns`); each row's value is checked here."""
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            "the model's tokenizer has no chat template, which a {messages} prompt_template "
            "needs; use a base model with one or a prompt_template with columns"
        )
    examples = [
        render_chat(
            bound_turns(check_turns(row.get(MESSAGES_COLUMN), n), max_chars, max_turns),
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
            trained = [
                any(
                    s < span_end and e > span_start
                    for span_start, span_end in example.trained_spans
                )
                for s, e in offsets
            ]
            tokenized, was_cut = label_example(
                ids, trained, cutoff_len, train_on_inputs=train_on_inputs
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
