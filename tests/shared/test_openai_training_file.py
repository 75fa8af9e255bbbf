"""A training file checked by OpenAI's fine-tuning rules (`shared.openai_training_file`): the
three line formats, the first problem named by its line, the least number of examples, the
format a job's method needs, and bounded work on hostile rows."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared.openai_training_file import (
    INVALID_N_EXAMPLES,
    INVALID_TRAINING_FILE,
    FileProblem,
    TrainingFileCheck,
    check_training_file,
    method_mismatch,
    not_json_lines,
)

USER = {"role": "user", "content": "What is the capital of Peru?"}
ANSWER = {"role": "assistant", "content": "Lima."}
CHAT = {"messages": [{"role": "system", "content": "Answer briefly."}, USER, ANSWER]}
# OpenAI's own example line of its supervised fine-tuning guide, a tool call.
TOOL_CALL_LINE = json.loads(
    '{"messages":[{"role":"user","content":"What is the weather in San Francisco?"},'
    '{"role":"assistant","tool_calls":[{"id":"call_id","type":"function","function":'
    '{"name":"get_current_weather","arguments":"{\\"location\\": \\"San Francisco, USA\\", '
    '\\"format\\": \\"celsius\\"}"}}]}],"parallel_tool_calls":false,"tools":[{"type":'
    '"function","function":{"name":"get_current_weather","description":"Get the current '
    'weather","parameters":{"type":"object","properties":{"location":{"type":"string",'
    '"description":"The city and country, eg. San Francisco, USA"},"format":{"type":"string",'
    '"enum":["celsius","fahrenheit"]}},"required":["location","format"]}}}]}')
PROMPT_COMPLETION = {"prompt": "Capital of Peru?", "completion": "Lima."}
PREFERENCE = {
    "input": {"messages": [USER], "tools": [], "parallel_tool_calls": True},
    "preferred_output": [{"role": "assistant", "content": "Lima."}],
    "non_preferred_output": [{"role": "assistant", "content": "Cusco."}],
}


def chat(*messages: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"messages": list(messages), **top}


def file_of(line: dict[str, Any], n: int = 10) -> list[dict[str, Any]]:
    return [copy.deepcopy(line) for _ in range(n)]


def problem_of(*rows: dict[str, Any]) -> str:
    check = check_training_file(rows, min_examples=1)
    assert check.problem is not None
    assert check.problem.code == INVALID_TRAINING_FILE
    return check.problem.message


@pytest.mark.parametrize(("line", "kind"), [
    (CHAT, "chat"), (TOOL_CALL_LINE, "chat"), (PROMPT_COMPLETION, "prompt_completion"),
    (PREFERENCE, "preference"),
], ids=["chat", "tool_call", "prompt_completion", "preference"])
def test_a_file_of_ten_valid_lines_of_each_format_passes(line: dict[str, Any], kind: str) -> None:
    assert check_training_file(file_of(line)) == TrainingFileCheck(kind, 10, None)


def test_fewer_than_ten_examples_is_openais_invalid_n_examples() -> None:
    check = check_training_file(file_of(CHAT, 7))

    assert check == TrainingFileCheck("chat", 7, FileProblem(
        INVALID_N_EXAMPLES,
        "Training file has 7 example(s), but must have at least 10 examples", None))


def test_an_empty_file_has_no_format_and_no_examples() -> None:
    check = check_training_file([])

    assert (check.kind, check.examples) == (None, 0)
    assert check.problem is not None and check.problem.code == INVALID_N_EXAMPLES


def test_min_examples_is_a_parameter() -> None:
    assert check_training_file(file_of(CHAT, 3), min_examples=3).problem is None
    assert check_training_file(file_of(CHAT, 3), min_examples=4).problem is not None


def test_the_first_problem_stops_the_check_and_names_its_line() -> None:
    read: list[int] = []

    def rows() -> Iterator[dict[str, Any]]:
        for n in range(1, 20):
            read.append(n)
            yield chat(USER, {"role": "robot", "content": "x"}) if n == 3 else CHAT

    check = check_training_file(rows())

    assert check.problem == FileProblem(
        INVALID_TRAINING_FILE,
        "line 3: messages[1].role 'robot' is not one of system, user, assistant, tool", 3)
    assert check.examples == 2  # the valid lines before it
    assert read == [1, 2, 3]


@pytest.mark.parametrize(("line", "message"), [
    (chat(USER), "line 1: no assistant message to train on"),
    (chat(USER, {**ANSWER, "weight": 0}),
     "line 1: no assistant message to train on: every assistant message has weight 0"),
    (chat(USER, ANSWER, {**ANSWER, "weight": 7}),
     "line 1: messages[2].weight must be 0 or 1, not 7"),
    (chat(USER, {**ANSWER, "weight": True}), "line 1: messages[1].weight must be 0 or 1, not true"),
    (chat(USER, {**ANSWER, "weight": 1.0}), "line 1: messages[1].weight must be 0 or 1, not 1.0"),
    (chat({**USER, "weight": 1}, ANSWER),
     "line 1: messages[0].weight is only allowed on assistant messages"),
    (chat(USER, ANSWER, foo=1), "line 1: unknown key 'foo'"),
    (chat({**USER, "mood": "calm"}, ANSWER), "line 1: unknown key 'mood' in messages[0]"),
    ({"messages": []}, "line 1: messages must be a non-empty list of messages, not an empty list"),
    ({"messages": "hi"}, "line 1: messages must be a non-empty list of messages, not 'hi'"),
    (chat(USER, "hi"), "line 1: messages[1] must be a message object, not 'hi'"),
    (chat({"content": "hi"}, ANSWER), "line 1: messages[0].role missing is not one of system, "
     "user, assistant, tool"),
    (chat({"role": "developer", "content": "Be brief."}, USER, ANSWER),
     "line 1: messages[0].role 'developer' is not one of system, user, assistant, tool"),
    (chat({"role": "user"}, ANSWER), "line 1: messages[0] lacks 'content'"),
    (chat({"role": "user", "content": None}, ANSWER),
     "line 1: messages[0].content must be a string or a list of text parts, not null"),
    (chat(USER, {"role": "assistant"}), "line 1: messages[1] has neither content nor tool_calls"),
    (chat({**USER, "name": 3}, ANSWER), "line 1: messages[0].name must be a string, not 3"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_chat_lines_breaking_a_rule_are_named(line: dict[str, Any], message: str) -> None:
    assert problem_of(line) == message


def test_weights_zero_and_one_train_where_one_assistant_message_is_trained() -> None:
    line = chat(USER, {**ANSWER, "weight": 0}, USER, {**ANSWER, "weight": 1}, USER, ANSWER)

    assert check_training_file([line], min_examples=1).problem is None


def test_content_may_be_a_list_of_text_parts_but_not_of_images() -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": "What is "},
                                         {"type": "text", "text": "this?"}]}
    image = {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "https://x/y.png"}}]}

    assert check_training_file([chat(parts, ANSWER)], min_examples=1).problem is None
    assert problem_of(chat(image, ANSWER)) == (
        "line 1: messages[0].content[0].type 'image_url' is not supported: Tunery trains text "
        "models, so content parts must be of type 'text'")
    assert problem_of(chat({"role": "user", "content": []}, ANSWER)) == (
        "line 1: messages[0].content must be a string or a list of text parts, not an empty list")
    assert problem_of(chat({"role": "user", "content": [{"type": "text", "text": 1}]}, ANSWER)) \
        == "line 1: messages[0].content[0].text must be a string, not 1"


@pytest.mark.parametrize(("line", "message"), [
    (chat(USER, {"role": "function", "name": "f", "content": "{}"}),
     "line 1: messages[1]: role 'function' is OpenAI's deprecated function calling"),
    (chat(USER, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}),
     "line 1: messages[1]: function_call is OpenAI's deprecated function calling"),
    (chat(USER, ANSWER, functions=[{"name": "f"}]),
     "line 1: functions is OpenAI's deprecated function calling"),
])
def test_deprecated_function_calling_is_refused_pointing_to_tools(line: dict[str, Any],
                                                                  message: str) -> None:
    found = problem_of(line)

    assert found.startswith(message)
    assert found.endswith("use tools, tool_calls and role 'tool'")


def test_null_optional_fields_as_openai_objects_serialize_them_pass() -> None:
    answer = {**ANSWER, "refusal": None, "audio": None, "function_call": None,
              "tool_calls": None, "name": None}

    assert check_training_file([chat(USER, answer)], min_examples=1).problem is None
    assert problem_of(chat(USER, {**ANSWER, "refusal": "I can't."})).startswith(
        "line 1: messages[1].refusal is not supported")


def _with_call(**change: Any) -> dict[str, Any]:
    line = copy.deepcopy(TOOL_CALL_LINE)
    call = line["messages"][1]["tool_calls"][0]
    for path, value in change.items():
        *parents, leaf = path.split("__")
        target = call
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return line


def _with_tool(**change: Any) -> dict[str, Any]:
    line = copy.deepcopy(TOOL_CALL_LINE)
    line["tools"][0]["function"].update(change)
    return line


@pytest.mark.parametrize(("line", "message"), [
    (_with_call(type="code"), "line 1: messages[1].tool_calls[0].type must be 'function', not "
     "'code'"),
    (_with_call(function__arguments={"location": "SF"}),
     "line 1: messages[1].tool_calls[0].function.arguments must be a string, not an object"),
    (_with_call(extra=1), "line 1: unknown key 'extra' in messages[1].tool_calls[0]"),
    (chat(USER, {"role": "assistant", "tool_calls": []}),
     "line 1: messages[1].tool_calls must be a non-empty list of tool calls, not an empty list"),
    (chat(USER, {"role": "tool", "content": "18C"}, ANSWER), "line 1: messages[1] lacks "
     "'tool_call_id'"),
    (_with_tool(name="get weather"), "line 1: tools[0].function.name must be 1 to 64 letters, "
     "digits, underscores or dashes, not 'get weather'"),
    (_with_tool(parameters="{}"), "line 1: tools[0].function.parameters must be a JSON Schema "
     "object, not '{}'"),
    ({**TOOL_CALL_LINE, "tools": {"type": "function"}},
     "line 1: tools must be a list of tools, not an object"),
    ({**TOOL_CALL_LINE, "parallel_tool_calls": "no"},
     "line 1: parallel_tool_calls must be true or false, not 'no'"),
])
def test_tools_and_tool_calls_breaking_a_rule_are_named(line: dict[str, Any],
                                                        message: str) -> None:
    assert problem_of(line) == message


def test_a_tool_message_answers_a_call_and_the_assistant_trains_after_it() -> None:
    line = copy.deepcopy(TOOL_CALL_LINE)
    line["messages"] += [{"role": "tool", "tool_call_id": "call_id", "content": "18C"},
                         {"role": "assistant", "content": "It is 18C."}]

    assert check_training_file([line], min_examples=1).problem is None


@pytest.mark.parametrize(("line", "message"), [
    ({**PROMPT_COMPLETION, "label": 1}, "line 1: unknown key 'label'"),
    ({"prompt": "Capital of Peru?"}, "line 1: missing key 'completion': a prompt_completion "
     "line has exactly prompt and completion"),
    ({"prompt": "Capital?", "completion": ["Lima"]}, "line 1: completion must be a string, not "
     "a list"),
])
def test_prompt_completion_lines_have_exactly_two_strings(line: dict[str, Any],
                                                          message: str) -> None:
    assert problem_of(line) == message


def test_preference_outputs_may_be_spelled_as_completions() -> None:
    line = {"input": PREFERENCE["input"],
            "preferred_completion": PREFERENCE["preferred_output"],
            "non_preferred_completion": PREFERENCE["non_preferred_output"]}

    assert check_training_file(file_of(line)) == TrainingFileCheck("preference", 10, None)


@pytest.mark.parametrize(("change", "message"), [
    ({"preferred_completion": PREFERENCE["preferred_output"]},
     "line 1: both preferred_output and preferred_completion: they are one field, give one"),
    ({"non_preferred_output": [ANSWER, ANSWER]}, "line 1: non_preferred_output must be a list "
     "of one assistant message, not a list"),
    ({"preferred_output": [USER]}, "line 1: preferred_output[0].role must be 'assistant', not "
     "'user'"),
    ({"preferred_output": [{**ANSWER, "weight": 1}]},
     "line 1: preferred_output[0].weight is only allowed in chat (supervised) files"),
    ({"input": {"messages": [USER], "foo": 1}}, "line 1: unknown key 'foo' in input"),
    ({"input": {"tools": []}}, "line 1: missing key 'input.messages'"),
    ({"input": [USER]}, "line 1: input must be an object with messages, not a list"),
    ({"score": 3}, "line 1: unknown key 'score'"),
])
def test_preference_lines_breaking_a_rule_are_named(change: dict[str, Any], message: str) -> None:
    assert problem_of({**PREFERENCE, **change}) == message


def test_a_preference_line_lacking_an_output_is_named() -> None:
    line = {k: v for k, v in PREFERENCE.items() if k != "non_preferred_output"}

    assert problem_of(line) == "line 1: missing key 'non_preferred_output'"


def test_the_first_line_decides_the_format_and_a_line_of_another_is_named() -> None:
    check = check_training_file([CHAT, CHAT, PREFERENCE, CHAT])

    assert check.kind == "chat"
    assert check.problem is not None and check.problem.line == 3
    assert check.problem.message == (
        "line 3: a preference example, but line 1 made this a chat file: every line must have "
        "the same format")


def test_a_first_line_of_no_format_says_what_a_line_has() -> None:
    check = check_training_file([{"text": "hello"}, CHAT])

    assert check.kind is None and check.problem is not None
    assert check.problem.message.startswith("line 1: cannot tell the training format")
    assert check.problem.message.endswith("this one has keys 'text'")


def test_a_later_line_of_no_format_is_checked_as_the_files_format() -> None:
    assert problem_of(CHAT, {"text": "hello"}) == "line 2: unknown key 'text'"


def test_a_row_that_is_not_an_object_is_named() -> None:
    assert problem_of(CHAT, ["user", "hi"]) == "line 2: expected a JSON object, not a list"  # type: ignore[arg-type]


def test_nul_characters_are_named_with_their_line_and_place() -> None:
    assert problem_of(CHAT, chat({"role": "user", "content": "a\x00b"}, ANSWER)) == (
        "line 2: messages[0].content contains a NUL character (\\u0000)")
    assert problem_of(chat(USER, ANSWER, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"a\x00": 1}}}])) == (
        "line 1: a key of tools[0].function.parameters contains a NUL character (\\u0000)")


def test_method_mismatch_gives_openais_message_for_a_chat_file_in_a_dpo_job() -> None:
    chat_file = check_training_file(file_of(CHAT))

    assert method_mismatch(chat_file, "supervised") is None
    assert method_mismatch(chat_file, "dpo", file_id="file-abc") == FileProblem(
        INVALID_TRAINING_FILE,
        "Invalid file format. Input file file-abc is in the fine-tune-chat format, but the "
        "specified fine-tuning job is not using 'supervised' as the training method (provided "
        "method=dpo).", None)


def test_method_mismatch_refuses_a_preference_file_in_a_supervised_job() -> None:
    preference = check_training_file(file_of(PREFERENCE))
    completion = check_training_file(file_of(PROMPT_COMPLETION))

    assert method_mismatch(preference, "dpo") is None
    mismatch = method_mismatch(preference, "supervised")
    assert mismatch is not None and mismatch.code == INVALID_TRAINING_FILE
    assert "Input file is in the fine-tune-preference format" in mismatch.message
    assert "not using 'dpo' as the training method (provided method=supervised)" in \
        mismatch.message
    assert method_mismatch(completion, "supervised") is None
    assert method_mismatch(completion, "dpo") is not None


def test_method_mismatch_leaves_a_file_of_no_format_to_its_own_problem() -> None:
    assert method_mismatch(check_training_file([{"text": "x"}]), "dpo") is None


@pytest.mark.parametrize("check", [
    TrainingFileCheck("chat", 12, None),
    TrainingFileCheck("preference", 2, FileProblem(INVALID_TRAINING_FILE, "line 3: x", 3)),
    TrainingFileCheck(None, 0, FileProblem(INVALID_N_EXAMPLES, "Training file has 0", None)),
])
def test_a_check_survives_json(check: TrainingFileCheck) -> None:
    stored = json.loads(json.dumps(check.to_json()))

    assert TrainingFileCheck.from_json(stored) == check


@pytest.mark.parametrize(("data", "field"), [
    ({"kind": "text", "examples": 1, "problem": None}, "kind"),
    ({"kind": "chat", "examples": -1, "problem": None}, "examples"),
    ({"kind": "chat", "examples": True, "problem": None}, "examples"),
    ({"kind": "chat", "examples": 1, "problem": "bad"}, "problem"),
    ({"kind": "chat", "examples": 1, "problem": {"code": "x", "message": "m", "line": 1}},
     "problem.code"),
    ({"kind": "chat", "examples": 1,
      "problem": {"code": INVALID_TRAINING_FILE, "message": "m", "line": 0}}, "problem.line"),
])
def test_from_json_refuses_what_to_json_never_writes_naming_the_field(data: dict[str, Any],
                                                                     field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} must"):
        TrainingFileCheck.from_json(data)


def test_not_json_lines_is_a_file_problem_without_a_line() -> None:
    check = not_json_lines("csv")

    assert (check.kind, check.examples) == (None, 0)
    assert check.problem is not None and check.problem.line is None
    assert check.problem.message.startswith("the training file is a csv file")


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _deep_object(depth: int, leaf: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "string", "default": leaf}
    for _ in range(depth):
        value = {"type": "object", "properties": {"x": value}}
    return value


def test_messages_ten_thousand_levels_deep_are_a_problem_not_a_crash() -> None:
    assert problem_of(CHAT, {"messages": _nested(10_000, "hi")}) == (
        "line 2: messages[0] must be a message object, not a list")


def test_tool_parameters_ten_thousand_levels_deep_are_walked_without_recursion() -> None:
    deep = _with_tool(parameters=_deep_object(10_000, "ok"))
    assert check_training_file([deep], min_examples=1).problem is None

    message = problem_of(_with_tool(parameters=_deep_object(10_000, "a\x00")))
    assert message.startswith("line 1: tools[0].function.parameters.properties.x.")
    assert message.endswith(".default contains a NUL character (\\u0000)")
    assert len(message) < 300  # the path is shortened


def test_a_100_mb_string_is_checked_in_bounded_time_and_never_quoted() -> None:
    huge = "x" * (100 * 1024 * 1024)
    started = time.monotonic()

    assert check_training_file([chat(USER, {"role": "assistant", "content": huge})],
                               min_examples=1).problem is None
    message = problem_of(chat(USER, {"role": "assistant", "content": huge + "\x00"}))
    role = problem_of(chat(USER, {"role": huge, "content": "x"}))

    assert message == "line 1: messages[1].content contains a NUL character (\\u0000)"
    assert role.startswith("line 1: messages[1].role 'xxxx") and len(role) < 200
    assert time.monotonic() - started < 10
