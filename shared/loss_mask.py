"""Which tokens of an example the loss is computed on: the one rule the worker trains with and
the API previews with.

Labels are -100 (`IGNORE_INDEX`, ignored by the loss) on tokens the model is not trained to
write. A prompt-template example trains its completion and the EOS after it; a chat example
trains its assistant turns as the model's chat template renders them, except those of
`weight` 0 (OpenAI's chat format); system, user and tool turns are context. Both find the
trained tokens by character offsets, never by token ids: with pad == EOS (SmolLM2) masking by
id would also mask the EOS the model must learn to emit.

Pure standard library. The worker hands in transformers' tokenizer and `apply_chat_template`
(`worker.pipeline.examples`, `worker.pipeline.chat`), the API its own tokenizers-and-jinja
reading of the same files (`shared.token_preview`); each fits the small protocols here.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.dataset_columns import MESSAGES_COLUMN, TOOLS_COLUMN

IGNORE_INDEX = -100

Turn = Mapping[str, Any]
Offsets = Sequence[tuple[int, int]]

# A token covers at most as many characters as its vocabulary entry is long: byte-level BPE
# writes one vocabulary character per byte and a character is at least one byte; SentencePiece
# writes one per character. Twice the longest entry leaves room for normalizers that fold
# several characters into one (NFC, NFKC). Used when a tokenizer lists no vocabulary.
_FALLBACK_TOKEN_CHARS = 128


Tools = Sequence[Mapping[str, Any]]

# Bounded quotes of a value that is not what it should be: a row may be deep or huge.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 200


class ChatRenderer(Protocol):
    """Renders a conversation, and the tools it may call, with a model's chat template, as
    `apply_chat_template(..., tools=tools, tokenize=False)` does. A template that refuses the
    conversation raises `ValueError` (`LossMaskError` or a subclass of its own)."""

    def __call__(self, messages: Sequence[Turn], *, add_generation_prompt: bool,
                 tools: Tools | None = None) -> str: ...


class Vocabulary(Protocol):
    """Anything that lists its tokens: transformers' tokenizers and `tokenizers.Tokenizer`."""

    def get_vocab(self) -> Mapping[str, int]: ...


class LossMaskError(ValueError):
    """A row or a chat template the trained tokens cannot be found for; the message says why
    and what to do."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class ChatExample:
    """One rendered conversation and the character ranges of `text` the loss is computed on."""

    text: str
    trained_spans: tuple[tuple[int, int], ...]
    untrained_turns: int = 0
    """Assistant turns of weight 0: rendered as context, not trained."""


def max_render_chars(cutoff_len: int, vocabulary: Vocabulary) -> int:
    """The most characters of one rendered example that tokenization can keep: what lies
    beyond `cutoff_len` tokens is cut before training anyway, so rendering stops there and a
    template that repeats a long cell cannot blow up the memory it takes."""
    try:
        longest = max((len(token) for token in vocabulary.get_vocab()), default=0)
    except (AttributeError, NotImplementedError, TypeError):
        longest = 0
    return cutoff_len * 2 * (longest or _FALLBACK_TOKEN_CHARS)


def check_turns(value: Any, row_number: int) -> list[Turn]:
    """The row's `messages` as a list of turns; `LossMaskError` naming the row otherwise.

    A turn's content is a string or a list of text parts (OpenAI's chat format), which
    become one string joined by newlines, as vLLM joins them for a template that reads
    strings; an assistant turn with `tool_calls` may have none (its content is then None).
    An assistant turn's `weight`, if any, is 0 or 1."""
    turns = [_checked_turn(t) for t in value] if isinstance(value, list | tuple) else []
    if not turns or any(t is None for t in turns):
        raise LossMaskError(
            f"row {row_number}: {MESSAGES_COLUMN} must be a non-empty list of "
            f'{{"role": ..., "content": ...}} objects with string values (an assistant turn '
            f"may have tool_calls instead of content), got {_SHOWN.repr(value)}"
        )
    checked: list[Turn] = [t for t in turns if t is not None]
    for i, turn in enumerate(checked):
        weight = turn.get("weight")
        if turn["role"] == "assistant" and weight is not None and (
                isinstance(weight, bool) or weight not in (0, 1)):
            raise LossMaskError(
                f"row {row_number}: {MESSAGES_COLUMN}[{i}].weight must be 0 or 1 (0: the turn "
                f"is not trained), not {_SHOWN.repr(weight)}")
    return checked


def _checked_turn(turn: Any) -> dict[str, Any] | None:
    """The turn with its content as one string (None for an assistant's tool calls alone),
    or None when it is not a turn."""
    if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str):
        return None
    content = turn.get("content")
    if isinstance(content, str):
        return dict(turn)
    if (isinstance(content, list | tuple) and content
            and all(isinstance(p, Mapping) and p.get("type") == "text"
                    and isinstance(p.get("text"), str) for p in content)):
        return {**turn, "content": "\n".join(p["text"] for p in content)}
    calls = turn.get("tool_calls")
    if content is None and turn["role"] == "assistant" and isinstance(calls, list) and calls:
        return {**turn, "content": None}
    return None


def check_tools(value: Any, row_number: int) -> list[dict[str, Any]] | None:
    """The row's `tools` (function definitions the chat template renders); None when it has
    none; `LossMaskError` naming the row when they are not a list of objects."""
    if value is None:
        return None
    if isinstance(value, list | tuple) and all(isinstance(t, Mapping) for t in value):
        return [dict(t) for t in value] or None
    raise LossMaskError(
        f"row {row_number}: {TOOLS_COLUMN} must be a list of tool definitions (objects such as "
        f'{{"type": "function", "function": {{...}}}}), got {_SHOWN.repr(value)}')


def is_trained(turn: Turn) -> bool:
    """Whether the loss is computed on the turn: an assistant turn whose weight is not 0."""
    return turn["role"] == "assistant" and turn.get("weight") != 0


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
        content = turn.get("content")
        size = len(content) if isinstance(content, str) else 0
        if left is not None and isinstance(content, str) and size > left:
            turn = {**turn, "content": content[:left]}
        kept.append(turn)
        if left is not None:
            left -= size
    return kept


def render_chat(messages: Sequence[Turn], render: ChatRenderer, *,
                tools: Tools | None = None) -> ChatExample:
    """Render one conversation with the `tools` it may call; the trained spans are its
    assistant turns but those of weight 0 (`is_trained`). The template never sees `weight`.

    An assistant turn's span is what rendering it adds after the generation prompt of the
    conversation so far, minus trailing whitespace (the newline after `</s>` is never
    generated, so it is not trained). That only works for templates that render a prefix of a
    conversation as a prefix of its text; any other template is refused with `LossMaskError`,
    as is one that ignores the conversation's tools or tool_calls (its text is the same
    without them) or refuses them: trained on, the model would learn calls it never sees.
    """
    shown = [{k: v for k, v in turn.items() if k != "weight"} for turn in messages]
    calls = any(turn.get("tool_calls") for turn in shown)
    try:
        text = render(shown, add_generation_prompt=False, tools=tools)
    except ValueError as exc:
        if not (tools or calls):
            raise
        raise LossMaskError(f"the model's chat template cannot render the conversation's tools "
                            f"or tool_calls: {exc}") from None
    if tools:
        _check_rendered(text, render, shown, None, "the row's tools (its tools column)")
    if calls:
        bare = [{k: v for k, v in turn.items() if k != "tool_calls"} for turn in shown]
        _check_rendered(text, render, bare, tools, "the assistant turns' tool_calls")
    spans = []
    for i, turn in enumerate(messages):
        if not is_trained(turn):
            continue
        before = render(shown[:i], add_generation_prompt=True, tools=tools)
        through = render(shown[: i + 1], add_generation_prompt=False, tools=tools)
        if not (through.startswith(before) and text.startswith(through)):
            raise LossMaskError(
                "the model's chat template does not render a conversation's first turns as the "
                "start of the whole conversation, so the assistant turns cannot be located; "
                "use a prompt_template with columns instead of {messages}"
            )
        spans.append((len(before), len(through.rstrip())))
    untrained = sum(t["role"] == "assistant" and not is_trained(t) for t in messages)
    return ChatExample(text, tuple(spans), untrained)


def _check_rendered(text: str, render: ChatRenderer, without: Sequence[Turn],
                    tools: Tools | None, what: str) -> None:
    """Refuse a template whose text for the conversation is the same `without` what it was
    given; one that refuses the conversation without them does read them."""
    try:
        same = render(without, add_generation_prompt=False, tools=tools) == text
    except ValueError:
        return
    if same:
        raise LossMaskError(
            f"the model's chat template does not render {what}: the conversation's text is the "
            "same without them. Use a base model whose chat template supports tool calling, or "
            "leave them out")


def in_spans(offsets: Offsets, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token (its character offsets) overlaps one of the trained spans: a chat
    example's trained tokens. Special tokens with empty offsets overlap nothing."""
    return [any(s < end and e > start for start, end in spans) for s, e in offsets]


def after_prompt(offsets: Offsets, prompt_chars: int) -> list[bool]:
    """Whether each token ends past the prompt's `prompt_chars` characters: a prompt-template
    example's completion tokens. A token straddling the boundary counts as completion, so the
    first answer token is always trained; special tokens (BOS) have empty (0, 0) offsets and
    land in the prompt."""
    return [end > prompt_chars for _start, end in offsets]


def with_trained_eos(
    ids: Sequence[int], trained: Sequence[bool], eos_id: int
) -> tuple[list[int], list[bool]]:
    """A prompt-template example's ids ending in a trained EOS, so the model learns to stop.

    An EOS already there is the template's own (ChatML's `<|im_end|>`) or one the tokenizer
    appends with empty offsets; either way it is trained, not doubled.
    """
    if ids and ids[-1] == eos_id:
        return list(ids), [*trained[:-1], True]
    return [*ids, eos_id], [*trained, True]


def label_example(
    ids: Sequence[int], trained: Sequence[bool], cutoff_len: int, *, train_on_inputs: bool
) -> tuple[TokenizedExample | None, bool]:
    """Cut `ids` to `cutoff_len` and label them: -100 where `trained` is False, or every token
    with `train_on_inputs`. Returns (example, whether it was cut); the example is None when no
    trained token is left.

    A prompt-template example cut here loses the EOS `with_trained_eos` gave it: teaching the
    model to stop mid-answer would be worse."""
    was_cut = len(ids) > cutoff_len
    ids, trained = list(ids[:cutoff_len]), trained[:cutoff_len]
    if train_on_inputs:
        return TokenizedExample(ids, list(ids)), was_cut
    if not any(trained):
        return None, was_cut
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    return TokenizedExample(ids, labels), was_cut
