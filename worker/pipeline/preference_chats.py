"""Preference pairs in OpenAI's format, rendered with the base model's chat template.

A row is `{"input": {"messages": [...], "tools": [...]}, "preferred_output": [{"role":
"assistant", "content": "..."}], "non_preferred_output": [...]}` (`tools` optional; the answers
also spelled `preferred_completion` / `non_preferred_completion`). It becomes the prompt /
chosen / rejected texts ORPO and DPO train on:

- prompt: `input.messages` rendered with the chat template and its generation prompt;
- chosen, rejected: each answer as the template renders it after that prompt, its content and
  the end-of-turn marker (`</s>`, `<|im_end|>`), so the model learns to stop, without the
  whitespace after the marker. That is chat mode's rule for an assistant turn
  (`shared.loss_mask.render_chat`), applied to the conversation ending in each answer.

TRL tokenizes these texts with the tokenizer's own special tokens (DPO) or puts a BOS in front
when the first token is not one (ORPO). A template that writes the BOS itself would then
start with two; so the prompt loses a leading BOS text that the tokenizer adds by itself, and
either trainer sees the tokens of the rendered conversation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared import loss_mask
from shared.loss_mask import Turn
from worker.pipeline.chat import check_turns, render_chat
from worker.pipeline.errors import PipelineError


def openai_preference_rows(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    columns: Sequence[str],
    *,
    max_chars: int | None = None,
    max_turns: int | None = None,
) -> list[dict[str, str]]:
    """Every row as `{"prompt", "chosen", "rejected"}` texts; `columns` are the row's input
    and its two answers (`shared.dataset_columns.OPENAI_PREFERENCE_COLUMNS` or the
    `*_completion` spelling). The conversation is cut as chat mode cuts it
    (`loss_mask.bound_turns`: at most `max_turns` turns, `max_chars` characters), each answer
    at `max_chars`. `PipelineError` naming the row and the field for a row that is not in the
    format."""
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            "the model's tokenizer has no chat template, which rows in OpenAI's preference "
            "format need; use a base model with one or prompt / chosen / rejected columns"
        )
    input_column, chosen_column, rejected_column = columns
    bos = added_bos_text(tokenizer)
    pairs = []
    for number, row in enumerate(rows, start=1):
        turns, tools = _conversation(row.get(input_column), number, input_column)
        turns = loss_mask.bound_turns(turns, max_chars, max_turns)
        chosen = _answer(row.get(chosen_column), number, chosen_column, max_chars)
        rejected = _answer(row.get(rejected_column), number, rejected_column, max_chars)
        prompt, chosen_text = _rendered_answer(turns, chosen, tokenizer, tools)
        _, rejected_text = _rendered_answer(turns, rejected, tokenizer, tools)
        if bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        pairs.append({"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text})
    return pairs


def added_bos_text(tokenizer: Any) -> str | None:
    """The BOS token's text when the tokenizer puts one in front of every text by itself."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return str(tokenizer.bos_token) if ids[:1] == [bos_id] else None


def _rendered_answer(
    turns: Sequence[Turn], answer: Turn, tokenizer: Any, tools: list[Mapping[str, Any]] | None
) -> tuple[str, str]:
    """(prompt, answer): the conversation ending in `answer` rendered, cut where the answer's
    trained span starts and ends."""
    example = render_chat([*turns, answer], tokenizer, tools=tools)
    start, end = example.trained_spans[-1]
    return example.text[:start], example.text[start:end]


def _conversation(
    value: Any, number: int, column: str
) -> tuple[list[Turn], list[Mapping[str, Any]] | None]:
    if not isinstance(value, Mapping):
        raise PipelineError(
            f'row {number}: {column} must be an object {{"messages": [...], "tools": [...]}}, '
            f"got {str(value)[:200]!r}"
        )
    turns = check_turns(value.get("messages"), number)
    tools = value.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(tool, Mapping) for tool in tools)
    ):
        raise PipelineError(
            f"row {number}: {column}.tools must be a list of tool definitions (objects), got "
            f"{str(tools)[:200]!r}"
        )
    return turns, tools or None


def _answer(value: Any, number: int, column: str, max_chars: int | None) -> Turn:
    """The one assistant message of an answer column, its content cut at `max_chars`."""
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], Mapping)
        and value[0].get("role") == "assistant"
        and isinstance(value[0].get("content"), str)
    ):
        content = value[0]["content"]
        return {"role": "assistant", "content": content[:max_chars] if max_chars else content}
    raise PipelineError(
        f'row {number}: {column} must be a list of one {{"role": "assistant", "content": '
        f'"..."}} message with text content, got {str(value)[:200]!r}'
    )
