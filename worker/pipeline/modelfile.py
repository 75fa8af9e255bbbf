"""The Ollama Modelfile written beside a GGUF export: FROM the file, the chat TEMPLATE and a
default SYSTEM translated from the base's chat template where that translation is exact,
PARAMETER stop for the tokens that end a turn.

A Jinja chat template is a program and Ollama's TEMPLATE is a Go template, so there is no
general translation. What is translated is the common shape: each message rendered as a fixed
prefix, its content and a fixed suffix per role, then a fixed generation prompt, and possibly a
default system message when the conversation has none. That shape is read off the template by
rendering it with marker contents and checked on a longer conversation; a template of any
other shape gets no TEMPLATE line, and the Modelfile says so in a comment (Ollama then falls
back to the chat template stored in the GGUF file's metadata, which it may or may not know).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELFILE = "Modelfile"
_ROLES = ("system", "user", "assistant")
# Contents no real template can produce or alter: they mark where content goes.
_MARK = {role: f"\x00tunery-{role}-content\x00" for role in _ROLES}
_MARK_2 = {role: f"\x00tunery-{role}-content-2\x00" for role in _ROLES}


@dataclass(frozen=True)
class ChatShape:
    """A chat template read as a per-role wrapping: `wrap[role]` is (prefix, suffix)."""

    wrap: dict[str, tuple[str, str]]
    generation_prompt: str
    default_system: str | None

    def render(self, roles: list[str], marks: dict[str, str]) -> str:
        """What the template renders for messages of `roles` with contents `marks`, and the
        generation prompt."""
        turns = "".join(self.wrap[r][0] + marks[r] + self.wrap[r][1] for r in roles)
        return turns + self.generation_prompt


def read_chat_shape(tokenizer: Any) -> ChatShape | None:
    """The template's per-role shape, or None when it has no template or another shape."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(roles: list[str], *, marks: dict[str, str] = _MARK,
               generation: bool = False) -> str:
        messages = [{"role": role, "content": marks[role]} for role in roles]
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation)
        return str(text)

    try:
        system = render(["system"])
        with_user = render(["system", "user"])
        with_assistant = render(["system", "user", "assistant"])
        prompted = render(["system", "user"], generation=True)
        user_only = render(["user"])
        check = render(["system", "user", "assistant", "user"], marks=_MARK_2, generation=True)
    except Exception:  # a template that raises for these roles has another shape
        return None
    if not (with_user.startswith(system) and with_assistant.startswith(with_user)
            and prompted.startswith(with_user)):
        return None
    wrap: dict[str, tuple[str, str]] = {}
    for role, text in (("system", system), ("user", with_user[len(system):]),
                       ("assistant", with_assistant[len(with_user):])):
        prefix, mark, suffix = text.partition(_MARK[role])
        if not mark or any(m in prefix + suffix for m in _MARK.values()):
            return None
        wrap[role] = (prefix, suffix)
    shape = ChatShape(wrap, prompted[len(with_user):], None)
    if shape.render(["system", "user", "assistant", "user"], _MARK_2) != check:
        return None
    user_turn = shape.render(["user"], _MARK)[: -len(shape.generation_prompt) or None]
    if user_only == user_turn:
        return shape
    # A default system message, as SmolLM2's template adds: `SYSTEM` in the Modelfile.
    system_prefix, system_suffix = wrap["system"]
    head = user_only.removesuffix(user_turn)
    if head == user_only or not (head.startswith(system_prefix)
                                 and head.endswith(system_suffix)):
        return None
    default = head[len(system_prefix): len(head) - len(system_suffix)]
    return ChatShape(wrap, shape.generation_prompt, default)


def go_template(shape: ChatShape) -> str:
    """Ollama's TEMPLATE for `shape`: every message in order, then the generation prompt."""
    branches = []
    for keyword, role in zip(("if", "else if", "else if"), _ROLES, strict=True):
        prefix, suffix = shape.wrap[role]
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_literal(prefix)}'
                        f"{{{{ .Content }}}}{_literal(suffix)}")
    return ("{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}"
            + _literal(shape.generation_prompt))


def _literal(text: str) -> str:
    """`text` as Go template output: as is, unless it holds an action delimiter."""
    if "{{" in text or "}}" in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def stop_tokens(tokenizer: Any, generation_eos_ids: list[int]) -> list[str]:
    """The tokens that end the model's turn: its EOS and the generation config's EOS ids."""
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    for token_id in generation_eos_ids:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(token, str) and token not in tokens:
            tokens.append(token)
    return tokens


def generation_eos_ids(model_dir: Path) -> list[int]:
    """`eos_token_id` of the checkpoint's generation_config.json (an int or a list)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def modelfile_text(gguf_name: str, tokenizer: Any, model_dir: Path) -> str:
    """The Modelfile for `gguf_name` (in the same folder), from the merged model's tokenizer
    and its folder `model_dir`."""
    lines = [f"FROM ./{gguf_name}"]
    shape = read_chat_shape(tokenizer)
    template = None if shape is None else go_template(shape)
    # A Modelfile's triple-quoted string has no escape for its own delimiter.
    if shape is None or template is None or '"""' in template + (shape.default_system or ""):
        lines.append("# No TEMPLATE: this model's chat template is not a fixed per-role "
                     "wrapping Tunery can translate exactly; Ollama uses the GGUF file's own.")
    else:
        lines.append(f'TEMPLATE """{template}"""')
        if shape.default_system is not None:
            lines.append(f'SYSTEM """{shape.default_system}"""')
    for token in stop_tokens(tokenizer, generation_eos_ids(model_dir)):
        lines.append(f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_modelfile(output_dir: Path, gguf_name: str, tokenizer: Any, model_dir: Path) -> Path:
    """Write `Modelfile` into `output_dir`, beside `gguf_name`."""
    path = output_dir / MODELFILE
    path.write_text(modelfile_text(gguf_name, tokenizer, model_dir), encoding="utf-8")
    return path
