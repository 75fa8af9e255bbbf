"""The Modelfile's TEMPLATE is translated from the chat template only where the translation is
exact: rendering the translation must give what the Jinja template gives, and a template of
another shape gets none. Real tokenizers (the tiny model's, with its template swapped)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from worker.pipeline.modelfile import go_template, modelfile_text, read_chat_shape

SYSTEM_BY_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}{{ '[system]be brief[/system]' }}{% endif %}"
    "{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + '[/' + m['role'] + ']' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
)
# Numbers the turns: no fixed wrapping per role.
COUNTING = (
    "{% for m in messages %}{{ loop.index|string + ':' + m['content'] + '\n' }}{% endfor %}"
)


def with_template(tokenizer: Any, template: str | None) -> Any:
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Our Go template, executed for the small subset it uses (range, if/else if, .Content,
    string literals): enough to check the translation without an Ollama binary."""
    body = re.fullmatch(r"\{\{ range \.Messages \}\}(.*)\{\{ end \}\}\{\{ end \}\}(.*)",
                        template, re.S)
    assert body is not None
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else|\Z)',
                               body[1], re.S))
    out = ""
    for message in messages:
        out += branches[message["role"]].replace("{{ .Content }}", message["content"])
    return out + body[2]


def test_the_tiny_models_template_translates_and_renders_the_same_text(
    tiny_tokenizer: Any
) -> None:
    shape = read_chat_shape(tiny_tokenizer)
    assert shape is not None and shape.default_system is None
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]

    expected = tiny_tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
    assert render_go(go_template(shape), messages) == expected


def test_a_default_system_message_becomes_the_modelfiles_system(
    tiny_tokenizer: Any, tmp_path: Path
) -> None:
    tokenizer = with_template(tiny_tokenizer, SYSTEM_BY_DEFAULT)

    text = modelfile_text("model-f16.gguf", tokenizer, tmp_path)

    assert 'SYSTEM """be brief"""' in text
    assert '{{ else if eq .Role "user" }}[user]{{ .Content }}[/user]' in text
    assert '{{ if eq .Role "system" }}[system]{{ .Content }}[/system]' in text


@pytest.mark.parametrize("template", [COUNTING, None])
def test_a_template_of_another_shape_or_none_gets_no_template_and_says_so(
    tiny_tokenizer: Any, tmp_path: Path, template: str | None
) -> None:
    text = modelfile_text("model-q8_0.gguf", with_template(tiny_tokenizer, template), tmp_path)

    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    assert text.startswith("FROM ./model-q8_0.gguf\n# No TEMPLATE")
    assert 'PARAMETER stop "</s>"' in text


def test_stop_tokens_include_the_generation_configs_eos_ids(
    tiny_tokenizer: Any, tmp_path: Path
) -> None:
    bos_id = tiny_tokenizer.convert_tokens_to_ids("<s>")
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [{bos_id}]}}')

    text = modelfile_text("m.gguf", tiny_tokenizer, tmp_path)

    assert 'PARAMETER stop "</s>"\nPARAMETER stop "<s>"\n' in text
