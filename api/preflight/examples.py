"""The first rows as the job would train on them: the `examples` of the dry run's report.

Rendered with the dataset preview's text rendering; one function, so a rendering that shows
tokens instead replaces its body and nothing else.
"""

from __future__ import annotations

from api.schemas import ExampleOut
from shared import datasets
from shared.models import Dataset
from shared.schema import DataConfig, TrainingConfig


def preview_examples(dataset: Dataset | None, data: DataConfig,
                     training: TrainingConfig) -> list[ExampleOut]:
    """Up to `datasets.FIRST_ROWS` rows of an uploaded `dataset` rendered with the job's
    template; none for other sources (their rows are unknown here) or ORPO (no template)."""
    if dataset is None or training.preference_optimization == "ORPO":
        return []
    preview = datasets.preview(dataset, data.prompt_template, datasets.FIRST_ROWS)
    return [ExampleOut(prompt=e.prompt, completion=e.completion, prompt_cut=e.prompt_cut,
                       completion_cut=e.completion_cut, problem=problem)
            for e, problem in zip(preview.examples, preview.problems, strict=True)]
