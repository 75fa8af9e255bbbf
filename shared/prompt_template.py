"""Rendering a row with a prompt template, shared by the worker (training examples) and the API
(dataset previews) so that a preview shows exactly what the model will be trained on.

Templates are checked by `shared.schema.template_placeholders`; pure standard library.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.schema import template_placeholders

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Example:
    """One rendered row: the loss is computed on `completion` only."""

    prompt: str
    completion: str


def render_example(row: Row, template: str) -> Example:
    """Substitute the row's values into `template` without `str.format`.

    The completion starts at the last placeholder: its value plus any literal text after it.
    Everything before it is the prompt. None, NaN and missing cells render as "".
    """
    pieces: list[tuple[str, str | None]] = []
    for literal, field, _spec, _conversion in string.Formatter().parse(template):
        if literal:
            pieces.append((literal, None))
        if field is not None:
            pieces.append((_cell(row.get(field)), field))
    last = max(i for i, (_text, field) in enumerate(pieces) if field is not None)
    prompt = "".join(text for text, _field in pieces[:last])
    completion = "".join(text for text, _field in pieces[last:])
    return Example(prompt, completion)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def missing_columns(template: str, columns: Sequence[str]) -> list[str]:
    """The template's placeholders that are not among `columns`, each once, in template order.

    Raises `shared.schema.TemplateError` for a template that is not allowed at all.
    """
    return [name for name in dict.fromkeys(template_placeholders(template)) if name not in columns]
