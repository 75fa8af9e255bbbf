"""A finished job's result file (`fine-tune-results`): its per-step metrics as the CSV that
OpenAI's users read, served base64-encoded as OpenAI serves it unless the operator says
otherwise (`openai.result_files_base64`)."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Sequence

from shared.models import JobMetric

COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
FILE_NAME = "step_metrics.csv"


def result_csv(metrics: Sequence[JobMetric]) -> str:
    """One line per step that has a training or validation metric, in step order; the last
    value written for a step wins (a resumed attempt reports its steps again)."""
    rows: dict[int, dict[str, float]] = {}
    for metric in metrics:
        row = rows.setdefault(metric.step, {})
        values = metric.values
        for column, key in (("train_loss", "loss"), ("train_accuracy", "mean_token_accuracy"),
                            ("valid_loss", "eval_loss"),
                            ("valid_mean_token_accuracy", "eval_mean_token_accuracy")):
            if key in values:
                row[column] = values[key]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for step in sorted(rows):
        row = rows[step]
        writer.writerow([step, *(_cell(row.get(c)) for c in COLUMNS[1:])])
    return out.getvalue()


def served(csv_text: str, *, base64_encoded: bool) -> bytes:
    raw = csv_text.encode()
    return base64.b64encode(raw) if base64_encoded else raw


def _cell(value: float | None) -> str:
    return "" if value is None else repr(float(value))
