"""The API's token preview (tokenizers + jinja2, `shared.token_preview`) and the worker's
pipeline (transformers) are one truth: for real model folders, the same rows give the same
token ids and the same trained tokens, and a chat template renders the same text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from shared.chat_template import ChatTemplate, chat_template_source, special_tokens
from shared.dataset_files import LoadedDataset
from shared.loss_mask import IGNORE_INDEX
from shared.schema import DataConfig
from shared.token_preview import SHOWN_TOKENS, preview_tokens
from tests.conftest import SHORT_ALPACA_TEMPLATE
from tests.worker.test_chat import CONVERSATION, TOOL_CONVERSATION, TOOLS_TEMPLATE, WEATHER_TOOL
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.examples import render_and_tokenize
from worker.pipeline.model import load_tokenizer

# Every kept token is among the preview's first and last SHOWN_TOKENS.
CUTOFF = 64
assert CUTOFF <= 2 * SHOWN_TOKENS

CHAT_ROWS = [
    {"messages": CONVERSATION},
    {"messages": CONVERSATION[1:3]},
    # Cut by cutoff_len inside the assistant turn.
    {"messages": [CONVERSATION[1], {"role": "assistant", "content": "Answer: " + "red " * 80}]},
    # Cut before any assistant token: the worker leaves it out.
    {"messages": [{"role": "user", "content": "blue green " * 60}, CONVERSATION[2]]},
    # A turn of weight 0 is context; one of weight 1 is trained.
    {"messages": [CONVERSATION[1], {**CONVERSATION[2], "weight": 0}, CONVERSATION[3],
                  {**CONVERSATION[4], "weight": 1}]},
    # Every assistant turn of weight 0: nothing to train, the worker leaves it out.
    {"messages": [CONVERSATION[1], {**CONVERSATION[2], "weight": 0}]},
    # Content as OpenAI's text parts.
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of"},
                                               {"type": "text", "text": "Peru?"}]},
                  CONVERSATION[2]]},
]


def _template_rows() -> list[dict[str, Any]]:
    lines = DATASET_PATH.read_text(encoding="utf-8").splitlines()[:6]
    rows = [json.loads(line) for line in lines]
    rows.append({"instruction": "Repeat: " + "paper " * 70, "input": "", "output": "Answer."})
    rows.append({"instruction": "Count.", "input": "", "output": "Answer: " + "one " * 70})
    return rows


@pytest.fixture(params=["tiny", "smollm2"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    name = "tiny_model_dir" if request.param == "tiny" else "smollm2_dir"
    return Path(request.getfixturevalue(name))


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("template", [SHORT_ALPACA_TEMPLATE, "{messages}"])
def test_the_preview_tokens_and_trained_flags_equal_the_worker_pipeline(
    model_dir: Path, template: str, train_on_inputs: bool
) -> None:
    rows = CHAT_ROWS if template == "{messages}" else _template_rows()
    allowed = [model_dir.parent]
    data = DataConfig(data_path="owner/name", prompt_template=template, cutoff_len=CUTOFF,
                      train_on_inputs=train_on_inputs)
    tokenizer = load_tokenizer(str(model_dir), allowed_local_dirs=allowed)
    trained = render_and_tokenize(LoadedDataset(list(rows[0]), rows, "rows"), tokenizer, data,
                                  log=lambda line: None)

    previewed = preview_tokens(str(model_dir), rows, prompt_template=template,
                               cutoff_len=CUTOFF, train_on_inputs=train_on_inputs,
                               allowed_local_dirs=allowed)

    assert all(row.problem is None for row in previewed)
    kept = [row for row in previewed if not row.dropped]
    assert len(kept) == len(trained)
    assert len(kept) < len(rows) or train_on_inputs  # the preview drops what the worker drops
    assert any(row.kept_tokens < row.token_count for row in kept)  # cutoff_len cut some
    for row, example in zip(kept, trained, strict=True):
        tokens = row.first_tokens + row.last_tokens
        assert [t.position for t in tokens] == list(range(row.kept_tokens))
        assert [t.id for t in tokens] == example.input_ids
        assert [t.trained for t in tokens] == [label != IGNORE_INDEX for label in example.labels]


TEMPLATES = {
    "whitespace control (trim_blocks, lstrip_blocks)": (
        "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n"
        "[U] {{ m['content'] }}\n    {% else %}\n[{{ m['role'] | upper }}] {{ m['content'] }}\n"
        "    {% endif %}\n{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
    ),
    "tojson keeps non-ASCII and HTML characters": (
        "{% for m in messages %}{{ m | tojson }}{{ m['content'] | tojson(indent=2) }}"
        "{% endfor %}"
    ),
    "namespace, dict and loop controls": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m['content'] }}"
        "{% endfor %}{{ dict(a=1)['a'] }}"
    ),
    "generation blocks and the tokenizer's special tokens": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{{ pad_token }}"
    ),
}


@pytest.mark.parametrize("source", TEMPLATES.values(), ids=TEMPLATES.keys())
def test_chat_templates_render_as_transformers_renders_them(tiny_tokenizer: Any,
                                                            source: str) -> None:
    messages = [*CONVERSATION[:2], {"role": "assistant", "content": "<b>Lima</b> & Perú \"ok\""}]
    variables = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

    for add_generation_prompt in (False, True):
        expected = tiny_tokenizer.apply_chat_template(
            messages, chat_template=source, tokenize=False,
            add_generation_prompt=add_generation_prompt)
        rendered = ChatTemplate(source, variables)(messages,
                                                   add_generation_prompt=add_generation_prompt)
        assert rendered == expected


def test_the_chat_template_and_special_tokens_are_read_from_where_transformers_reads_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "tokenizer.json", folder)
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "config {{ bos_token }}"},
                               {"name": "tool_use", "template": "tools"}]
    config["image_token"] = {"__type": "AddedToken", "content": "<image>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    listed = AutoTokenizer.from_pretrained(folder)
    (folder / "chat_template.jinja").write_text("file {{ eos_token }}")
    filed = AutoTokenizer.from_pretrained(folder)

    assert chat_template_source(config, None) == listed.get_chat_template()
    assert chat_template_source(config, None, tools=True) == listed.get_chat_template(
        tools=[WEATHER_TOOL])
    assert chat_template_source(config, "file {{ eos_token }}") == filed.get_chat_template()
    assert special_tokens(config) == listed.special_tokens_map


TOOL_ROWS = [
    {"messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL]},
    {"messages": [*TOOL_CONVERSATION[:3], {**TOOL_CONVERSATION[3], "weight": 0}],
     "tools": [WEATHER_TOOL]},
    {"messages": CONVERSATION},  # no tools: the default template
]


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_the_preview_and_the_worker_agree_on_tools_tool_calls_and_weights(
    tiny_model_dir: Path, tmp_path: Path, train_on_inputs: bool
) -> None:
    # A default template that renders no tools and a tool-use one: rows with tools must get
    # the tool-use template on both sides, as apply_chat_template(tools=...) chooses it.
    folder = tmp_path / "tools-model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "tokenizer.json", folder)
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": load_tokenizer(
            str(tiny_model_dir), allowed_local_dirs=[tiny_model_dir.parent]).chat_template},
        {"name": "tool_use", "template": TOOLS_TEMPLATE}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    allowed, cutoff = [tmp_path], 256
    data = DataConfig(data_path="owner/name", prompt_template="{messages}", cutoff_len=cutoff,
                      train_on_inputs=train_on_inputs)
    tokenizer = load_tokenizer(str(folder), allowed_local_dirs=allowed)
    trained = render_and_tokenize(LoadedDataset(["messages", "tools"], TOOL_ROWS, "rows"),
                                  tokenizer, data, log=lambda line: None)

    previewed = preview_tokens(str(folder), TOOL_ROWS, prompt_template="{messages}",
                               cutoff_len=cutoff, train_on_inputs=train_on_inputs,
                               allowed_local_dirs=allowed)

    assert [row.problem for row in previewed] == [None] * len(TOOL_ROWS)
    assert any('"name": "get_weather"' in "".join(p.text for p in row.parts)
               for row in previewed)
    assert len(previewed) == len(trained)
    for row, example in zip(previewed, trained, strict=True):
        assert row.kept_tokens == len(example.input_ids)
        assert row.trained_tokens == sum(label != IGNORE_INDEX for label in example.labels)
        for token in row.first_tokens + row.last_tokens:
            assert token.id == example.input_ids[token.position]
            assert token.trained == (example.labels[token.position] != IGNORE_INDEX)
    if not train_on_inputs:  # the weight-0 answer of row 2 is not trained, its call is
        assert 0 < previewed[1].trained_tokens < previewed[0].trained_tokens


def test_a_template_that_ignores_tools_is_a_row_problem_in_the_preview(
    tiny_model_dir: Path
) -> None:
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION, "tools": [WEATHER_TOOL]}]

    first, second = preview_tokens(str(tiny_model_dir), rows, prompt_template="{messages}",
                                   cutoff_len=CUTOFF, allowed_local_dirs=[tiny_model_dir.parent])

    assert first.problem is None
    assert second.problem is not None and second.problem.startswith(
        "the model's chat template does not render the row's tools")


def test_chat_templates_render_tools_and_tool_calls_as_transformers_renders_them(
    tiny_tokenizer: Any
) -> None:
    for add_generation_prompt in (False, True):
        expected = tiny_tokenizer.apply_chat_template(
            TOOL_CONVERSATION, tools=[WEATHER_TOOL], chat_template=TOOLS_TEMPLATE,
            tokenize=False, add_generation_prompt=add_generation_prompt)
        rendered = ChatTemplate(TOOLS_TEMPLATE, {})(
            TOOL_CONVERSATION, tools=[WEATHER_TOOL], add_generation_prompt=add_generation_prompt)
        assert rendered == expected
