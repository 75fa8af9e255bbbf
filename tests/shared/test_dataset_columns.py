"""The columns a job reads: one check, the same message for the API and the worker."""

from __future__ import annotations

import pytest

from shared.dataset_columns import (
    is_chat_template,
    missing_columns_message,
    missing_job_columns_message,
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


def test_chat_jobs_need_the_messages_column() -> None:
    assert is_chat_template(" {messages}\n")
    message = missing_job_columns_message(
        ["text"], prompt_template=" {messages}\n", preference_optimization="DONT"
    )

    assert message is not None and "['messages']" in message


def test_a_refused_template_raises_template_error() -> None:
    with pytest.raises(TemplateError):
        missing_job_columns_message(["a"], prompt_template="{a.b}", preference_optimization=None)
