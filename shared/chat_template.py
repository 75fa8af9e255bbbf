"""A model's chat template, read from its folder and rendered without transformers the way
transformers' `apply_chat_template(messages, tokenize=False)` renders it, so that the API,
which installs no ML library, previews the text the worker trains on.

Where the template and its variables come from, as `from_pretrained` reads them: a
`chat_template.jinja` file wins over `tokenizer_config.json`'s `chat_template` (a string, or a
list of named templates of which "default" is used). The template sees the tokenizer's named
special tokens (`bos_token`, `eos_token`, ... and model-specific `*_token` entries) besides
`messages`, `tools`, `documents` and `add_generation_prompt`; given tools, a config listing
several templates gives its "tool_use" one, as `apply_chat_template(tools=...)` chooses.

Rendering: a jinja2 `ImmutableSandboxedEnvironment` (a chat template is untrusted code) with
trim_blocks and lstrip_blocks, loop controls and `{% generation %}` blocks, a `tojson` that does
not escape HTML, and the `raise_exception`, `strftime_now`, `dict` and `namespace` globals.

Only `shared.token_preview` imports this module, inside the function that renders, so
`import api.main` does not load jinja2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# transformers' named special tokens; a config may add model-specific `*_token` entries.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                         "cls_token", "mask_token")
# Names a message's reasoning is passed under; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled, or that refused a conversation
    (`raise_exception`); the message says which."""


def chat_template_source(config: Mapping[str, Any], jinja_file: str | None, *,
                         tools: bool = False) -> str | None:
    """The template `apply_chat_template` uses: the `chat_template.jinja` file's text if there
    is one, else the config's `chat_template`; when it lists several, the "default" entry, or
    with `tools` the "tool_use" entry if there is one. None when the model has none."""
    if jinja_file is not None:
        return jinja_file
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("tool_use") if tools and "tool_use" in named \
            else named.get("default")
    return template if isinstance(template, str) and template else None


def special_tokens(
    config: Mapping[str, Any], legacy_map: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The special tokens a chat template sees as variables, by name: the config's named and
    model-specific `*_token` entries (a string, or an AddedToken object's `content`) and its
    `extra_special_tokens` when they are named; `special_tokens_map.json` (`legacy_map`) fills
    the gaps of configs that predate `added_tokens_decoder`."""
    found: dict[str, str] = {}
    if legacy_map is not None and "added_tokens_decoder" not in config:
        config = {**config, **{k: v for k, v in legacy_map.items() if k not in config
                               or config[k] is None}}
    for key, value in config.items():
        if key in _NAMED_SPECIAL_TOKENS or key.endswith("_token"):
            token = _token_text(value)
            if token is not None:
                found[key] = token
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            token = _token_text(value)
            if token is not None:
                found[str(key)] = token
    return found


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class ChatTemplate:
    """A compiled chat template with the model's special tokens; call it like the
    `shared.loss_mask.ChatRenderer` it is."""

    def __init__(self, source: str, variables: Mapping[str, str]) -> None:
        try:
            self._template = _compile(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None
        self._variables = dict(variables)

    def __call__(self, messages: Sequence[Mapping[str, Any]], *,
                 add_generation_prompt: bool,
                 tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        try:
            return self._template.render(
                **self._variables,
                messages=_template_messages(messages),
                tools=_plain(list(tools)) if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template refused the conversation: "
                                    f"{exc}") from None


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as transformers hands them to a template: plain JSON values, keys whose value
    is None dropped, and a message's reasoning under each name templates read it by."""
    out = []
    for message in messages:
        plain = {str(k): _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def _plain(value: Any) -> Any:
    """A copy of plain JSON values, as transformers hands a template its inputs."""
    return json.loads(json.dumps(value, default=str))


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers'
    assistant mask; rendering only writes its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


class _TemplateDict:
    """`dict(...)` in a template, without the class itself: no attribute access to it."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace` refusing underscore-prefixed names, which reach Python internals."""

    # jinja's own signature trick: `self` stays free to be a key, as in `namespace(self=1)`.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"got {name!r}"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment.from_string(source)
