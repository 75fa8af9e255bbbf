"""What a job would train on, token by token, for a dataset's first rows: the view that
`POST /v1/datasets/{id}/preview` gives with a `model_path`, and the finetune dry run.

The worker tokenizes with transformers; the API image has no ML library, so this reads the
model folder with the two libraries transformers itself uses underneath: `tokenizers` for
`tokenizer.json` and jinja2 for the chat template (`shared.chat_template`). Which tokens are
trained is `shared.loss_mask`'s rule, the worker's own, so preview and training agree; a test
holds them to it on real models (tests/worker/test_token_preview_parity.py).

The token preview needs a local model folder with a `tokenizer.json` (a fast tokenizer, as
chat mode needs anyway); a hub id is `NotLocalModel`, since the API downloads nothing.
`tokenizers` and jinja2 are imported only when a preview runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared import local_files
from shared.dataset_columns import MESSAGES_COLUMN, TOOLS_COLUMN, is_chat_template
from shared.loss_mask import (
    IGNORE_INDEX,
    LossMaskError,
    after_prompt,
    bound_turns,
    check_tools,
    check_turns,
    in_spans,
    label_example,
    max_render_chars,
    render_chat,
    with_trained_eos,
)
from shared.prompt_template import render_example
from shared.sources import SourceError, classify_source

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from shared.chat_template import ChatTemplate

TOKENIZER_FILE = "tokenizer.json"
# The files of a model folder the preview reads; the weights are never opened.
_READ_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja")
# The largest tokenizer file read: real ones are a few MB to a few tens of MB.
MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024

# Tokens shown at each end of an example, and characters of its text shown marked.
SHOWN_TOKENS = 40
SHOWN_TEXT_CHARS = 4000
# A preview renders at most this much of each row, whatever cutoff_len: the worker's own bound
# (`max_render_chars`) grows with cutoff_len to millions of characters, and a conversation is
# rendered again for each assistant turn. A row cut here says so (`render_cut`).
PREVIEW_RENDER_CHARS = 32_000
PREVIEW_TURNS = 64

TextKind = Literal["trained", "ignored", "cut"]


class TokenPreviewError(ValueError):
    """The model_path cannot give a token preview: refused, not a tokenizer folder, or a chat
    template a {messages} job cannot use. The message says why; the caller names the field."""


class NotLocalModel(TokenPreviewError):
    """A hub id: the token preview reads a local folder and the API downloads nothing."""


@dataclass(frozen=True)
class PreviewToken:
    position: int
    id: int
    text: str
    """The characters of the rendered text the token covers; a special token that covers
    none (BOS, the EOS the worker appends) shows as itself."""
    trained: bool
    """The loss is computed on it: inside cutoff_len and in the completion (chat: an
    assistant turn), or every kept token with train_on_inputs."""


@dataclass(frozen=True)
class TextPart:
    text: str
    kind: TextKind
    """trained: the loss is computed on it; ignored: the model sees it, no loss; cut: past
    cutoff_len, never seen."""


@dataclass(frozen=True)
class TokenizedRow:
    """One row as the job would see it. When `problem` is set the row is not tokenized: the
    other fields are empty."""

    parts: list[TextPart]
    """The rendered text (chat: through the model's chat template), in consecutive parts of
    one kind, at most SHOWN_TEXT_CHARS characters."""
    text_cut: bool
    """`parts` show only the first SHOWN_TEXT_CHARS characters."""
    token_count: int
    """Tokens of the rendered example (with the EOS the worker appends to a prompt-template
    example); more when `render_cut`."""
    kept_tokens: int
    """The first `min(token_count, cutoff_len)` tokens the model sees."""
    trained_tokens: int
    first_tokens: list[PreviewToken]
    last_tokens: list[PreviewToken]
    """The last kept tokens that are not among `first_tokens`, SHOWN_TOKENS at most; the
    positions say what lies between."""
    dropped: bool
    """No trained token within cutoff_len: the worker leaves the example out."""
    render_cut: bool
    """The row renders to more than the preview (or the worker) renders: only its start was
    tokenized, so `token_count` is a lower bound."""
    problem: str | None = None
    """Why this row cannot be tokenized: its `messages` are not turns, or the chat template
    refused them. The job would fail on it."""


def preview_tokens(
    model_path: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    prompt_template: str,
    cutoff_len: int,
    train_on_inputs: bool = False,
    allowed_local_dirs: Iterable[Path],
) -> list[TokenizedRow]:
    """Each of `rows` rendered and tokenized as a job with this `model_path` and data_config
    (`prompt_template`, `cutoff_len`, `train_on_inputs`) would train on it.

    `model_path` is checked as a job's is (`shared.sources.classify_source`, every file opened
    through `shared.local_files`). Raises `NotLocalModel` for a hub id and `TokenPreviewError`
    for any other model_path the preview cannot read; a row's own problem is its `problem`.
    """
    allowed = list(allowed_local_dirs)
    files = _read_model_files(model_path, allowed)
    tokenizer = _load_tokenizer(model_path, files[TOKENIZER_FILE])
    config = _json_object(model_path, files, "tokenizer_config.json")
    legacy = _json_object(model_path, files, "special_tokens_map.json") if (
        "special_tokens_map.json" in files) else None
    from shared.chat_template import special_tokens

    tokens = special_tokens(config, legacy)
    max_chars = min(max_render_chars(cutoff_len, tokenizer), PREVIEW_RENDER_CHARS)
    if is_chat_template(prompt_template):
        # Rows with tools get the template `apply_chat_template(tools=...)` would choose.
        templates = _ChatTemplates(model_path, config, files, tokens)
        max_turns = min(cutoff_len, PREVIEW_TURNS)
        return [_chat_row(row, n, tokenizer, templates, cutoff_len, train_on_inputs, max_chars,
                          max_turns)
                for n, row in enumerate(rows, start=1)]
    eos = tokens.get("eos_token")
    eos_id = tokenizer.token_to_id(eos) if eos is not None else None
    if eos_id is None:
        raise TokenPreviewError(
            f"{model_path!r}: the tokenizer has no EOS token; cannot mark example ends")
    return [_template_row(row, prompt_template, tokenizer, eos_id, cutoff_len, train_on_inputs,
                          max_chars)
            for row in rows]


def _read_model_files(model_path: str, allowed: list[Path]) -> dict[str, str]:
    """The tokenizer files of the local folder `model_path`, by name, read through verified
    descriptors."""
    try:
        source = classify_source(model_path, allowed, allow_urls=False, bare_hub_names=True)
    except SourceError as exc:
        raise TokenPreviewError(str(exc)) from None
    if source.kind == "hub":
        raise NotLocalModel(
            f"{model_path!r} is a hub id: the token preview reads a local model folder (inside "
            f"{local_files.ALLOWED_SETTING}), since the API downloads no model")
    if source.kind != "local" or source.path is None:
        raise TokenPreviewError(f"{model_path!r} is a dataset id, not a model")
    files: dict[str, str] = {}
    try:
        with local_files.open_tree(source.path, allowed, shown=model_path, recursive=False,
                                   wanted=lambda name: name in _READ_FILES) as tree:
            for opened in tree.files:
                if os.fstat(opened.fd).st_size > MAX_TOKENIZER_FILE_BYTES:
                    raise TokenPreviewError(
                        f"{model_path!r}: {opened.name} is larger than the "
                        f"{MAX_TOKENIZER_FILE_BYTES} bytes the preview reads")
                files[opened.name] = opened.reopen.read_text(encoding="utf-8")
    except local_files.LocalFileRefused as exc:
        raise TokenPreviewError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenPreviewError(f"{model_path!r}: cannot read its tokenizer files ({exc})"
                                ) from None
    if TOKENIZER_FILE not in files:
        raise TokenPreviewError(
            f"{model_path!r} has no {TOKENIZER_FILE}: the token preview reads a fast "
            "tokenizer's file, as saved by transformers' save_pretrained")
    return files


def _load_tokenizer(model_path: str, text: str) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust parser's errors have no common Python class
        raise TokenPreviewError(f"{model_path!r}: its {TOKENIZER_FILE} cannot be read: {exc}"
                                ) from None
    # transformers turns off a truncation or padding stored in the file unless asked for it.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _json_object(model_path: str, files: Mapping[str, str], name: str) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except ValueError as exc:
        raise TokenPreviewError(f"{model_path!r}: its {name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise TokenPreviewError(f"{model_path!r}: its {name} is not a JSON object")
    return value


class _ChatTemplates:
    """The model's chat template, and its tool-use template for rows with tools, compiled
    when first needed. `TokenPreviewError` when the model has none or it does not compile."""

    def __init__(self, model_path: str, config: Mapping[str, Any], files: Mapping[str, str],
                 tokens: Mapping[str, str]) -> None:
        self._model_path, self._config, self._files, self._tokens = (
            model_path, config, files, tokens)
        self._compiled: dict[bool, ChatTemplate] = {}
        self.get(tools=False)

    def get(self, *, tools: bool) -> ChatTemplate:
        if tools not in self._compiled:
            self._compiled[tools] = self._compile(tools)
        return self._compiled[tools]

    def _compile(self, tools: bool) -> ChatTemplate:
        from shared.chat_template import ChatTemplate, ChatTemplateError, chat_template_source

        source = chat_template_source(self._config, self._files.get("chat_template.jinja"),
                                      tools=tools)
        if source is None:
            raise TokenPreviewError(
                f"{self._model_path!r}: the model's tokenizer has no chat template, which a "
                "{messages} prompt_template needs; use a base model with one or a "
                "prompt_template with columns")
        try:
            return ChatTemplate(source, self._tokens)
        except ChatTemplateError as exc:
            raise TokenPreviewError(f"{self._model_path!r}: {exc}") from None


def _template_row(row: Mapping[str, Any], prompt_template: str, tokenizer: Tokenizer,
                  eos_id: int, cutoff_len: int, train_on_inputs: bool,
                  max_chars: int) -> TokenizedRow:
    example = render_example(row, prompt_template, max_chars=max_chars)
    text = example.prompt + example.completion
    encoding = tokenizer.encode(text, add_special_tokens=True)
    offsets = list(encoding.offsets)
    ids, trained = with_trained_eos(encoding.ids, after_prompt(offsets, len(example.prompt)),
                                    eos_id)
    offsets += [(0, 0)] * (len(ids) - len(offsets))
    return _tokenized(text, ids, offsets, trained, tokenizer, cutoff_len, train_on_inputs,
                      render_cut=example.prompt_cut or example.completion_cut)


def _chat_row(row: Mapping[str, Any], row_number: int, tokenizer: Tokenizer,
              templates: _ChatTemplates, cutoff_len: int, train_on_inputs: bool,
              max_chars: int, max_turns: int) -> TokenizedRow:
    from shared.chat_template import ChatTemplateError

    try:
        turns = check_turns(row.get(MESSAGES_COLUMN), row_number)
        tools = check_tools(row.get(TOOLS_COLUMN), row_number)
        bounded = bound_turns(turns, max_chars, max_turns)
        chat = render_chat(bounded, templates.get(tools=tools is not None), tools=tools)
    except (LossMaskError, ChatTemplateError) as exc:
        return _unusable(str(exc))
    # The template writes the special tokens itself, so the tokenizer adds none.
    encoding = tokenizer.encode(chat.text, add_special_tokens=False)
    offsets = list(encoding.offsets)
    return _tokenized(chat.text, list(encoding.ids), offsets,
                      in_spans(offsets, chat.trained_spans), tokenizer, cutoff_len,
                      train_on_inputs, render_cut=bounded != turns)


def _tokenized(text: str, ids: list[int], offsets: list[tuple[int, int]], trained: list[bool],
               tokenizer: Tokenizer, cutoff_len: int, train_on_inputs: bool, *,
               render_cut: bool) -> TokenizedRow:
    example, _was_cut = label_example(ids, trained, cutoff_len, train_on_inputs=train_on_inputs)
    kept = min(len(ids), cutoff_len)
    flags = [label != IGNORE_INDEX for label in example.labels] if example else [False] * kept
    tokens = [
        PreviewToken(i, token_id, text[start:end] if end > start
                     else tokenizer.id_to_token(token_id) or "", flag)
        for i, (token_id, (start, end), flag) in enumerate(
            zip(ids[:kept], offsets[:kept], flags, strict=True))
    ]
    first = tokens[:SHOWN_TOKENS]
    last = tokens[max(SHOWN_TOKENS, kept - SHOWN_TOKENS):]
    parts, text_cut = _parts(text, offsets[:kept], flags)
    return TokenizedRow(parts=parts, text_cut=text_cut, token_count=len(ids), kept_tokens=kept,
                        trained_tokens=sum(flags), first_tokens=first, last_tokens=last,
                        dropped=example is None, render_cut=render_cut)


def _parts(text: str, kept_offsets: Sequence[tuple[int, int]],
           flags: Sequence[bool]) -> tuple[list[TextPart], bool]:
    """The first SHOWN_TEXT_CHARS characters of `text` in runs of one kind: trained where a
    trained kept token covers them, cut past the last kept token, ignored otherwise."""
    shown = text[:SHOWN_TEXT_CHARS]
    kept_end = max((end for _start, end in kept_offsets), default=0)
    kinds: list[TextKind] = ["ignored"] * min(kept_end, len(shown))
    kinds += ["cut"] * (len(shown) - len(kinds))
    for (start, end), flag in zip(kept_offsets, flags, strict=True):
        if flag and start < len(shown):
            kinds[start:min(end, len(shown))] = ["trained"] * (min(end, len(shown)) - start)
    parts: list[TextPart] = []
    run_start = 0
    for i in range(1, len(shown) + 1):
        if i == len(shown) or kinds[i] != kinds[run_start]:
            parts.append(TextPart(shown[run_start:i], kinds[run_start]))
            run_start = i
    return parts, len(text) > len(shown)


def _unusable(problem: str) -> TokenizedRow:
    return TokenizedRow(parts=[], text_cut=False, token_count=0, kept_tokens=0,
                        trained_tokens=0, first_tokens=[], last_tokens=[], dropped=True,
                        render_cut=False, problem=problem)
