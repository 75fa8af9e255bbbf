"""The columns a dataset must have for a job: the prompt_template's placeholders, the
`messages` column of chat mode, or ORPO's preference columns.

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

# The columns `preference_optimization: ORPO` trains on.
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def is_chat_template(template: str) -> bool:
    """True for a prompt_template that selects chat mode: `{messages}`, nothing else."""
    return template.strip() == "{" + MESSAGES_COLUMN + "}"


def missing_job_columns_message(
    columns: Sequence[str], *, prompt_template: str, preference_optimization: str | None
) -> str | None:
    """A message naming the columns the job reads that `columns` lacks; None if none. ORPO
    reads its preference columns and ignores the prompt_template; every other job reads the
    template's placeholders (chat mode's `{messages}` is one).

    Raises `shared.schema.TemplateError` for a template that is not allowed at all.
    """
    if preference_optimization == "ORPO":
        return missing_preference_columns_message(columns)
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


def missing_preference_columns_message(columns: Sequence[str]) -> str | None:
    """A message naming the preference columns `columns` lacks, both lists shown; None if none."""
    missing = [name for name in PREFERENCE_COLUMNS if name not in columns]
    if not missing:
        return None
    return (
        f"ORPO needs the columns {list(PREFERENCE_COLUMNS)}; the dataset lacks {missing}. "
        f"Dataset columns: {list(columns)}"
    )
