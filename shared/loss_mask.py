"""Which tokens of an example the loss is computed on: the one rule the worker trains with and
the API previews with.

Labels are -100 (`IGNORE_INDEX`, ignored by the loss) on tokens the model is not trained to
write. A prompt-template example trains its completion and the EOS after it; a chat example
trains its assistant turns as the model's chat template renders them. Both find the trained
tokens by character offsets, never by token ids: with pad == EOS (SmolLM2) masking by id would
also mask the EOS the model must learn to emit.

Pure standard library. The worker hands in transformers' tokenizer and `apply_chat_template`
(`worker.pipeline.examples`, `worker.pipeline.chat`), the API its own tokenizers-and-jinja
reading of the same files (`shared.token_preview`); each fits the small protocols here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.dataset_columns import MESSAGES_COLUMN

IGNORE_INDEX = -100

Turn = Mapping[str, Any]
Offsets = Sequence[tuple[int, int]]

# A token covers at most as many characters as its vocabulary entry is long: byte-level BPE
# writes one vocabulary character per byte and a character is at least one byte; SentencePiece
# writes one per character. Twice the longest entry leaves room for normalizers that fold
# several characters into one (NFC, NFKC). Used when a tokenizer lists no vocabulary.
_FALLBACK_TOKEN_CHARS = 128


class ChatRenderer(Protocol):
    """Renders a conversation with a model's chat template, as `apply_chat_template(...,
    tokenize=False)` does."""

    def __call__(self, messages: Sequence[Turn], *, add_generation_prompt: bool) -> str: ...


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
    """The row's `messages` as a list of turns; `LossMaskError` naming the row otherwise."""
    if isinstance(value, list | tuple) and value:
        turns = list(value)
        if all(
            isinstance(t, Mapping)
            and isinstance(t.get("role"), str)
            and isinstance(t.get("content"), str)
            for t in turns
        ):
            return turns
    raise LossMaskError(
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


def render_chat(messages: Sequence[Turn], render: ChatRenderer) -> ChatExample:
    """Render one conversation; the trained spans are its assistant turns.

    An assistant turn's span is what rendering it adds after the generation prompt of the
    conversation so far, minus trailing whitespace (the newline after `</s>` is never
    generated, so it is not trained). That only works for templates that render a prefix of a
    conversation as a prefix of its text; any other template is refused with `LossMaskError`.
    """
    text = render(messages, add_generation_prompt=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise LossMaskError(
                "the model's chat template does not render a conversation's first turns as the "
                "start of the whole conversation, so the assistant turns cannot be located; "
                "use a prompt_template with columns instead of {messages}"
            )
        spans.append((len(before), len(through.rstrip())))
    return ChatExample(text, tuple(spans))


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
