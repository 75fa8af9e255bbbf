"""A request's prompts as token ids: chat through the base tokenizer's own chat template
(as the worker renders training conversations, `worker.pipeline.chat`), completions as the
tokenizer encodes text."""

from __future__ import annotations

from typing import Any

import jinja2

from inference.protocol import RequestRefused, bad_value
from shared import loss_mask


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None) -> list[int]:
    """The conversation rendered with `add_generation_prompt`, as token ids; `RequestRefused`
    naming `messages` when the model has no chat template or its template refuses them."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_value("messages", "this model has no chat template; send its prompt as text "
                        "to /v1/completions instead")
    try:
        # Content given as a list of text parts becomes one string, as vLLM gives it to a
        # template that reads strings; anything that is not a turn is refused.
        turns = loss_mask.check_turns(messages, 0)
    except loss_mask.LossMaskError:
        raise bad_value("messages", 'messages must be a list of {"role": ..., "content": ...} '
                        "objects with string (or text part) content") from None
    try:
        text = tokenizer.apply_chat_template(
            [dict(turn) for turn in turns], tools=tools or None, tokenize=False,
            add_generation_prompt=True,
        )
    # What a template raises on a conversation it cannot render: `raise_exception`, an
    # undefined or mistyped value.
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        raise bad_value("messages", f"the model's chat template refused the conversation: "
                        f"{exc}") from None
    # The template writes the special tokens (BOS included) itself.
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def text_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A completion prompt as the tokenizer encodes it, with its special tokens (BOS)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def context_exceeded(param: str, tokens: int, limit: int) -> RequestRefused:
    return RequestRefused(
        400, f"This model's maximum prompt length is {limit} tokens; the {param} have "
        f"{tokens} tokens. Shorten them.", param=param, code="context_length_exceeded")
