"""The columns a job reads: one check, the same message for the API and the worker."""

from __future__ import annotations

import pytest

from shared.dataset_columns import (
    is_chat_template,
    missing_columns_message,
    missing_job_columns_message,
    preference_format,
)
from shared.schema import TemplateError


def test_missing_template_column_error_lists_placeholders_and_columns() -> None:
    message = missing_columns_message("Q: {question} {context} A: {response}",
                                      ["question", "answer"])

    assert message is not None
    assert "['context', 'response']" in message
    assert "['question', 'context', 'response']" in message
    assert "['question', 'answer']" in message


def test_a_template_whose_columns_are_all_there_has_no_message() -> None:
    assert missing_columns_message("{a} {b} {a}", ["a", "b"]) is None


def test_orpo_jobs_read_the_preference_columns_not_the_template() -> None:
    message = missing_job_columns_message(
        ["prompt", "answer"], prompt_template="{answer}", preference_optimization="ORPO"
    )

    assert message is not None
    assert "['chosen', 'rejected']" in message
    assert "['prompt', 'answer']" in message


@pytest.mark.parametrize("method", ["ORPO", "DPO"])
@pytest.mark.parametrize("columns", [
    ["prompt", "chosen", "rejected", "id"],
    ["input", "preferred_output", "non_preferred_output"],
    ["input", "preferred_completion", "non_preferred_completion"],
])
def test_preference_jobs_read_either_format_whatever_the_template(
    method: str, columns: list[str]
) -> None:
    assert missing_job_columns_message(columns, prompt_template="{missing}",
                                       preference_optimization=method) is None
    assert preference_format(columns) == tuple(c for c in columns if c != "id")


def test_a_dataset_nearer_openais_format_is_told_what_that_format_lacks() -> None:
    message = missing_job_columns_message(
        ["input", "preferred_output"], prompt_template="{a}", preference_optimization="DPO"
    )

    assert message is not None
    assert message.startswith("DPO needs the columns ['prompt', 'chosen', 'rejected'] or those "
                              "of OpenAI's preference format")
    assert "the dataset lacks ['non_preferred_output']" in message
    assert preference_format(["input", "preferred_output"]) is None


def test_chat_jobs_need_the_messages_column() -> None:
    assert is_chat_template(" {messages}\n")
    message = missing_job_columns_message(
        ["text"], prompt_template=" {messages}\n", preference_optimization="DONT"
    )

    assert message is not None and "['messages']" in message


def test_a_refused_template_raises_template_error() -> None:
    with pytest.raises(TemplateError):
        missing_job_columns_message(["a"], prompt_template="{a.b}", preference_optimization=None)
