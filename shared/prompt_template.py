"""Rendering a row with a prompt template, shared by the worker (training examples) and the API
(dataset previews) so that a preview shows exactly what the model will be trained on.

Templates are checked by `shared.schema.template_placeholders`; pure standard library.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Example:
    """One rendered row: the loss is computed on `completion` only. `prompt_cut` and
    `completion_cut` say that a bound left text out of that part."""

    prompt: str
    completion: str
    prompt_cut: bool = False
    completion_cut: bool = False


def render_example(row: Row, template: str, *, max_chars: int | None = None) -> Example:
    """Substitute the row's values into `template` without `str.format`.

    The completion starts at the last placeholder: its value plus any literal text after it.
    Everything before it is the prompt. None, NaN and missing cells render as "".

    With `max_chars`, rendering stops adding text at that many characters in all, the prompt
    first: a prompt that fills the bound leaves an empty completion. Text past the bound is
    never built, so the memory a render takes is bounded whatever the template repeats.
    """
    prompt_parts, completion_parts = _parts(row, template)
    prompt, prompt_cut = _join_bounded(prompt_parts, max_chars)
    left = None if max_chars is None else max_chars - len(prompt)
    completion, completion_cut = _join_bounded(completion_parts, left)
    return Example(prompt, completion, prompt_cut, completion_cut)


def render_preview(row: Row, template: str, *, max_part_chars: int) -> Example:
    """Like `render_example`, with the prompt and the completion each cut at
    `max_part_chars`, so a preview shows where the completion starts however long the prompt."""
    prompt_parts, completion_parts = _parts(row, template)
    prompt, prompt_cut = _join_bounded(prompt_parts, max_part_chars)
    completion, completion_cut = _join_bounded(completion_parts, max_part_chars)
    return Example(prompt, completion, prompt_cut, completion_cut)


def completion_placeholder(template: str) -> str | None:
    """The placeholder the completion starts at: the template's last one (None if none)."""
    fields = [field for _literal, field, _spec, _conversion in string.Formatter().parse(template)
              if field is not None]
    return fields[-1] if fields else None


def _parts(row: Row, template: str) -> tuple[list[str], list[str]]:
    """The template's literal texts and cell values in order, split at the last placeholder
    into the prompt's and the completion's. The lists hold references, never copies."""
    cells: dict[str, str] = {}
    pieces: list[str] = []
    last = 0
    for literal, field, _spec, _conversion in string.Formatter().parse(template):
        if literal:
            pieces.append(literal)
        if field is not None:
            if field not in cells:
                cells[field] = _cell(row.get(field))
            last = len(pieces)
            pieces.append(cells[field])
    return pieces[:last], pieces[last:]


def _join_bounded(parts: list[str], max_chars: int | None) -> tuple[str, bool]:
    """The parts joined, cut at `max_chars` (None: no bound); and whether anything was cut."""
    if max_chars is None:
        return "".join(parts), False
    kept: list[str] = []
    left = max(max_chars, 0)
    for part in parts:
        if len(part) > left:
            kept.append(part[:left])
            return "".join(kept), True
        kept.append(part)
        left -= len(part)
    return "".join(kept), False


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)
