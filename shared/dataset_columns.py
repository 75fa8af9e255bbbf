"""The columns a dataset must have for a job: the prompt_template's placeholders, the
`messages` column of chat mode, or the preference columns of ORPO and DPO.

The API checks them at submit time (an uploaded dataset's columns are known) and in previews;
the worker checks them again on the rows it read. Both give the same messages. Pure standard
library: the API image has no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.schema import template_placeholders

# Chat mode is selected by a prompt_template that is exactly `{messages}`: rows hold
# OpenAI-style `{role, content}` turns in that column.
MESSAGES_COLUMN = "messages"
# In chat mode, an optional column of the function definitions a conversation may call
# (OpenAI's `tools`), which the model's chat template renders.
TOOLS_COLUMN = "tools"

# The methods of `preference_optimization` that train on preference pairs.
PREFERENCE_METHODS = ("ORPO", "DPO")
# The columns they train on: a prompt and the preferred and the other answer, as text.
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
# OpenAI's preference format: the conversation so far under `input` (`messages`, optional
# `tools`), each answer a list of one assistant message. Both spellings of the answers occur.
OPENAI_PREFERENCE_COLUMNS = ("input", "preferred_output", "non_preferred_output")
OPENAI_PREFERENCE_COMPLETION_COLUMNS = ("input", "preferred_completion",
                                        "non_preferred_completion")
# Where a dataset has the columns of several, the first wins.
PREFERENCE_FORMATS = (PREFERENCE_COLUMNS, OPENAI_PREFERENCE_COLUMNS,
                      OPENAI_PREFERENCE_COMPLETION_COLUMNS)


def is_chat_template(template: str) -> bool:
    """True for a prompt_template that selects chat mode: `{messages}`, nothing else."""
    return template.strip() == "{" + MESSAGES_COLUMN + "}"


def is_preference(preference_optimization: str | None) -> bool:
    """True for a `preference_optimization` that trains on preference pairs."""
    return preference_optimization in PREFERENCE_METHODS


def preference_format(columns: Sequence[str]) -> tuple[str, ...] | None:
    """The columns of the first of `PREFERENCE_FORMATS` that `columns` has all of; None."""
    return next((f for f in PREFERENCE_FORMATS if all(name in columns for name in f)), None)


def missing_job_columns_message(
    columns: Sequence[str], *, prompt_template: str, preference_optimization: str | None
) -> str | None:
    """A message naming the columns the job reads that `columns` lacks; None if none. ORPO
    and DPO read preference columns and ignore the prompt_template; every other job reads the
    template's placeholders (chat mode's `{messages}` is one).

    Raises `shared.schema.TemplateError` for a template that is not allowed at all.
    """
    if preference_optimization is not None and is_preference(preference_optimization):
        return missing_preference_columns_message(columns, method=preference_optimization)
    return missing_columns_message(prompt_template, columns)


def missing_columns(template: str, columns: Sequence[str]) -> list[str]:
    """The template's placeholders that are not among `columns`, each once, in template order.

    Raises `shared.schema.TemplateError` for a template that is not allowed at all.
    """
    return [name for name in dict.fromkeys(template_placeholders(template)) if name not in columns]


def missing_columns_message(template: str, columns: Sequence[str]) -> str | None:
    """A message naming the placeholders `columns` lacks, both lists shown; None if none.

    Raises `shared.schema.TemplateError` for a template that is not allowed at all.
    """
    placeholders = list(dict.fromkeys(template_placeholders(template)))
    missing = [name for name in placeholders if name not in columns]
    if not missing:
        return None
    return (
        f"prompt_template uses columns the dataset does not have: {missing}. Template "
        f"placeholders: {placeholders}; dataset columns: {list(columns)}"
    )


def missing_preference_columns_message(
    columns: Sequence[str], *, method: str = "ORPO"
) -> str | None:
    """A message naming the preference columns `columns` lacks, of the format it comes
    closest to, and the dataset's columns; None if it has one format's columns."""
    if preference_format(columns) is not None:
        return None
    nearest = max(PREFERENCE_FORMATS, key=lambda f: sum(name in columns for name in f))
    missing = [name for name in nearest if name not in columns]
    return (
        f"{method} needs the columns {list(PREFERENCE_COLUMNS)} or those of OpenAI's "
        f"preference format {list(OPENAI_PREFERENCE_COLUMNS)}; the dataset lacks {missing}. "
        f"Dataset columns: {list(columns)}"
    )
