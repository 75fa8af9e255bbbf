"""A chat row previewed without a model (`shared.datasets.chat_preview`) shows what a job
trains: the last assistant turn that is not of weight 0 is the completion, and an
assistant's tool calls read as `name(arguments)`."""

from __future__ import annotations

from shared.datasets import chat_preview

USER = {"role": "user", "content": "Weather in Lima?"}
CALL = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
    "name": "get_weather", "arguments": '{"city": "Lima"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "18 degrees"}
ANSWER = {"role": "assistant", "content": "18 degrees."}


def test_a_tool_call_reads_as_its_function_and_arguments() -> None:
    example, problem = chat_preview({"messages": [USER, CALL, RESULT, ANSWER]}, 1)

    assert problem is None
    assert example.prompt == ('user: Weather in Lima?\nassistant: get_weather({"city": "Lima"})'
                              "\ntool: 18 degrees\nassistant: ")
    assert example.completion == "18 degrees."


def test_the_completion_is_the_last_assistant_turn_a_job_trains() -> None:
    example, problem = chat_preview(
        {"messages": [USER, CALL, RESULT, {**ANSWER, "weight": 0}]}, 1)

    assert problem is None
    assert example.prompt == "user: Weather in Lima?\nassistant: "
    assert example.completion == ('get_weather({"city": "Lima"})\ntool: 18 degrees\n'
                                  "assistant: 18 degrees.")


def test_a_row_whose_assistant_turns_all_have_weight_0_is_left_out_and_says_why() -> None:
    example, problem = chat_preview({"messages": [USER, {**ANSWER, "weight": 0}]}, 3)

    assert example.completion == ""
    assert problem is not None and problem.startswith(
        "row 3 has no assistant turn to train on (those of weight 0 are not trained)")
