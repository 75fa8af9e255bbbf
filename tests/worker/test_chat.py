"""Chat mode: `messages` rows rendered with the model's chat template, loss on assistant turns."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shared.dataset_columns import is_chat_template
from shared.dataset_files import LoadedDataset
from shared.settings import Settings
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.chat import render_chat, render_chats, tokenize_chats
from worker.pipeline.errors import PipelineError
from worker.pipeline.labels import IGNORE_INDEX
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "Answer: Lima."},
    {"role": "user", "content": "And of Chile?"},
    {"role": "assistant", "content": "Answer: Santiago."},
]


def _trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous_trained = False
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token
            if not previous_trained:
                runs.append([])
            runs[-1].append(token)
        previous_trained = trained
    return runs


def test_only_a_template_of_exactly_messages_selects_chat_mode() -> None:
    assert is_chat_template("{messages}")
    assert is_chat_template(" {messages}\n")
    assert not is_chat_template("Chat: {messages}")
    assert not is_chat_template("{instruction} {messages}")


def test_labels_cover_exactly_each_assistant_turn_and_its_end_marker(tiny_tokenizer: Any) -> None:
    example = render_chat(CONVERSATION, tiny_tokenizer)

    (tokenized,) = tokenize_chats([example], tiny_tokenizer, cutoff_len=256)

    # The model's own template, tokenized as apply_chat_template would: no extra BOS or EOS.
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example.text == text
    expected_ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids == expected_ids
    runs = _trained_runs(tokenized.input_ids, tokenized.labels)
    # One trained run per assistant turn: its content and the template's "</s>", nothing of
    # the system or user turns, the "assistant: " header, or the newline after "</s>".
    assert [tiny_tokenizer.decode(run).strip() for run in runs] == [
        "Answer: Lima.</s>",
        "Answer: Santiago.</s>",
    ]
    assert all(run[-1] == tiny_tokenizer.eos_token_id for run in runs)
    assert tokenized.labels[-1] == IGNORE_INDEX  # the trailing "\n"


def test_train_on_inputs_in_chat_mode_trains_every_token(tiny_tokenizer: Any) -> None:
    example = render_chat(CONVERSATION, tiny_tokenizer)

    (tokenized,) = tokenize_chats([example], tiny_tokenizer, 256, train_on_inputs=True)

    assert tokenized.labels == tokenized.input_ids


def test_conversation_cut_before_any_assistant_token_is_dropped(tiny_tokenizer: Any) -> None:
    long_user = [{"role": "user", "content": "red green blue " * 30}, CONVERSATION[2]]
    examples = [
        render_chat(CONVERSATION[1:3], tiny_tokenizer),
        render_chat(long_user, tiny_tokenizer),
    ]
    lines: list[str] = []

    result = tokenize_chats(examples, tiny_tokenizer, cutoff_len=32, log=lines.append)

    assert len(result) == 1
    assert "1 truncated" in lines[-1] and "1 dropped" in lines[-1]



def _chat_config(**fields: Any) -> Any:
    from shared.schema import DataConfig

    return DataConfig(prompt_template="{messages}", **fields)


def test_cutoff_len_of_the_request_truncates_conversations(tiny_tokenizer: Any) -> None:
    from worker.pipeline.run import render_and_tokenize

    short = CONVERSATION[:3]  # 46 tokens
    long = [*CONVERSATION[:2], {"role": "assistant", "content": "Answer: " + "red " * 60}]
    dataset = LoadedDataset(["messages"], [{"messages": short}, {"messages": long}], "chats")
    lines: list[str] = []

    tokenized = render_and_tokenize(
        dataset, tiny_tokenizer, _chat_config(cutoff_len=48), log=lines.append
    )

    assert [len(e.input_ids) for e in tokenized] == [46, 48]
    assert "1 truncated to cutoff_len 48" in lines[-1]


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_train_on_inputs_of_the_request_decides_whether_chat_prompts_are_trained(
    tiny_tokenizer: Any, train_on_inputs: bool
) -> None:
    from worker.pipeline.run import render_and_tokenize

    dataset = LoadedDataset(["messages"], [{"messages": CONVERSATION}], "chats")

    (tokenized,) = render_and_tokenize(
        dataset, tiny_tokenizer, _chat_config(train_on_inputs=train_on_inputs),
        log=lambda line: None,
    )

    if train_on_inputs:
        assert tokenized.labels == tokenized.input_ids
    else:
        # The system turn comes first and is never trained.
        assert tokenized.labels[0] == IGNORE_INDEX
        assert len(_trained_runs(tokenized.input_ids, tokenized.labels)) == 2


@pytest.mark.parametrize(
    "messages",
    [
        "user: hi",
        [],
        [{"role": "user"}],
        [{"role": "user", "content": ["not", "a", "string"]}],
        [["user", "hi"]],
    ],
)
def test_rows_whose_messages_are_not_turns_are_named(tiny_tokenizer: Any, messages: Any) -> None:
    rows = [{"messages": CONVERSATION}, {"messages": messages}]

    with pytest.raises(PipelineError, match="row 2: messages must be a non-empty list"):
        render_chats(LoadedDataset(["messages"], rows, "d.jsonl"), tiny_tokenizer)


def test_tokenizer_without_chat_template_is_refused(tiny_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None

    with pytest.raises(PipelineError, match="no chat template"):
        render_chats(LoadedDataset(["messages"], [{"messages": CONVERSATION}], "x"), tokenizer)


def test_template_that_renders_earlier_turns_differently_is_refused(tiny_tokenizer: Any) -> None:
    # Shows only the last two messages: a conversation's start is not the start of its text.
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages[-2:] %}{{ m['content'] }}</s>{% endfor %}"

    with pytest.raises(PipelineError, match="cannot be located"):
        render_chat(CONVERSATION, tokenizer)


def test_chat_dataset_trains_through_run_job(
    tmp_path: Path, settings: Settings, make_request: Any
) -> None:
    rows = [json.loads(line) for line in DATASET_PATH.read_text().splitlines()]
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{r['instruction']} {r['input']}".strip()},
                        {"role": "assistant", "content": r["output"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    request = make_request(path, data={"prompt_template": "{messages}"})
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert any(line.startswith("chat mode: rendered 300 conversations") for line in reporter.lines)
    assert (result.train_rows, result.eval_rows) == (24, 12)
    assert result.last_loss is not None and result.first_loss is not None
    assert result.last_loss < result.first_loss


# A chat template that renders tools and tool calls, as tool-calling models' templates do.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<s>tools: ' + (tools | tojson) + '</s>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + ': ' }}"
    "{% if message.tool_calls is defined %}"
    "{% for call in message.tool_calls %}"
    "{{ '<call>' + call.function.name + ' ' + call.function.arguments + '</call>' }}"
    "{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Lima?"},
    {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    {"role": "assistant", "content": "Answer: 18 degrees."},
]


@pytest.fixture
def tools_tokenizer(tiny_tokenizer: Any) -> Any:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def _chat_rows(*rows: dict[str, Any]) -> LoadedDataset:
    return LoadedDataset(list(dict.fromkeys(k for row in rows for k in row)), list(rows), "chats")


def test_weight_0_turns_have_every_label_ignored_while_weight_1_turns_are_trained(
    tiny_tokenizer: Any
) -> None:
    weighted = [*CONVERSATION[:2], {**CONVERSATION[2], "weight": 0}, CONVERSATION[3],
                {**CONVERSATION[4], "weight": 1}]
    example = render_chat(weighted, tiny_tokenizer)

    (tokenized,) = tokenize_chats([example], tiny_tokenizer, cutoff_len=256)

    # The template never sees the weights: the text is the plain conversation's.
    assert example.text == tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example.untrained_turns == 1
    runs = _trained_runs(tokenized.input_ids, tokenized.labels)
    assert [tiny_tokenizer.decode(run).strip() for run in runs] == ["Answer: Santiago.</s>"]
    lima = example.text.index("Answer: Lima.")
    lima_tokens = [i for i, (start, end) in enumerate(tiny_tokenizer(
        example.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
        if start < lima + len("Answer: Lima.</s>") and end > lima]
    assert lima_tokens and all(tokenized.labels[i] == IGNORE_INDEX for i in lima_tokens)


def test_a_conversation_whose_assistant_turns_all_have_weight_0_is_dropped_and_counted(
    tiny_tokenizer: Any
) -> None:
    from worker.pipeline.run import render_and_tokenize

    untrained = [CONVERSATION[1], {**CONVERSATION[2], "weight": 0}]
    lines: list[str] = []

    tokenized = render_and_tokenize(
        _chat_rows({"messages": CONVERSATION}, {"messages": untrained}), tiny_tokenizer,
        _chat_config(), log=lines.append)

    assert len(tokenized) == 1
    assert "loss on 2 assistant turns, not on 1 of weight 0" in lines[-2]
    assert "1 dropped (no trained assistant token within cutoff_len)" in lines[-1]


def test_every_turn_of_weight_0_leaves_nothing_to_train_and_says_so(tiny_tokenizer: Any) -> None:
    from worker.pipeline.run import render_and_tokenize

    untrained = [CONVERSATION[1], {**CONVERSATION[2], "weight": 0}]

    with pytest.raises(PipelineError, match="those of weight 0 are not trained"):
        render_and_tokenize(_chat_rows({"messages": untrained}), tiny_tokenizer, _chat_config(),
                            log=lambda line: None)


@pytest.mark.parametrize("weight", [7, -1, True, "0"])
def test_a_weight_other_than_0_or_1_is_named_with_its_row(tiny_tokenizer: Any,
                                                           weight: Any) -> None:
    rows = [{"messages": CONVERSATION},
            {"messages": [CONVERSATION[1], {**CONVERSATION[2], "weight": weight}]}]

    with pytest.raises(PipelineError, match=r"row 2: messages\[1\]\.weight must be 0 or 1"):
        render_chats(_chat_rows(*rows), tiny_tokenizer)


def test_content_given_as_text_parts_renders_as_one_string(tiny_tokenizer: Any) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of Peru?"}]},
             CONVERSATION[2]]

    (example,) = render_chats(_chat_rows({"messages": parts}), tiny_tokenizer)

    assert "user: What is the capital\nof Peru?</s>" in example.text


def test_tools_reach_the_template_and_tool_calls_are_trained_but_tool_results_are_not(
    tools_tokenizer: Any
) -> None:
    from worker.pipeline.run import render_and_tokenize

    lines: list[str] = []

    (tokenized,) = render_and_tokenize(
        _chat_rows({"messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL]}), tools_tokenizer,
        _chat_config(), log=lines.append)

    text = tools_tokenizer.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL],
                                               tokenize=False)
    assert '"name": "get_weather"' in text  # the tools were rendered
    assert tokenized.input_ids == tools_tokenizer(text, add_special_tokens=False)["input_ids"]
    runs = _trained_runs(tokenized.input_ids, tokenized.labels)
    assert [tools_tokenizer.decode(run).strip() for run in runs] == [
        '<call>get_weather {"city": "Lima"}</call></s>',
        "Answer: 18 degrees.</s>",
    ]
    assert "1 with tools; loss on 2 assistant turns" in lines[-2]


def test_a_template_that_ignores_tools_fails_the_job_naming_the_row(tiny_tokenizer: Any) -> None:
    rows = [{"messages": CONVERSATION},
            {"messages": CONVERSATION, "tools": [WEATHER_TOOL]}]

    with pytest.raises(PipelineError, match="row 2: the model's chat template does not render "
                                            r"the row's tools \(its tools column\)"):
        render_chats(_chat_rows(*rows), tiny_tokenizer)


def test_a_template_that_raises_on_tool_calls_fails_the_job_naming_the_row(
    tiny_tokenizer: Any
) -> None:
    # The tiny template concatenates every message's content, which a tool call lacks.
    rows = [{"messages": CONVERSATION}, {"messages": TOOL_CONVERSATION[:2]}]

    with pytest.raises(PipelineError, match="row 2: the model's chat template cannot render "
                                            "the conversation's tools or tool_calls"):
        render_chats(_chat_rows(*rows), tiny_tokenizer)


def test_a_template_that_drops_tool_calls_fails_the_job_naming_the_row(
    tiny_tokenizer: Any
) -> None:
    call = {**TOOL_CONVERSATION[1], "content": ""}
    rows = [{"messages": [TOOL_CONVERSATION[0], call]}]

    with pytest.raises(PipelineError, match="row 1: the model's chat template does not render "
                                            "the assistant turns' tool_calls"):
        render_chats(_chat_rows(*rows), tiny_tokenizer)


@pytest.mark.parametrize("tools", ["get_weather", [["get_weather"]], {"type": "function"}])
def test_tools_that_are_not_a_list_of_objects_are_named_with_their_row(
    tools_tokenizer: Any, tools: Any
) -> None:
    with pytest.raises(PipelineError, match="row 1: tools must be a list of tool definitions"):
        render_chats(_chat_rows({"messages": CONVERSATION, "tools": tools}), tools_tokenizer)
