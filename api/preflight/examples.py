"""The first rows as the job would train on them: the `examples` of the dry run's report.

Rendered as the dataset preview renders them (`api.example_preview`): with the job's own
model when it is a local folder, token by token through its tokenizer and chat template, with
the tokens the loss applies to and what cutoff_len cuts.
"""

from __future__ import annotations

from api.example_preview import render_examples
from api.schemas import ExampleOut
from shared import datasets, token_preview
from shared.dataset_columns import is_preference
from shared.models import Dataset
from shared.schema import FinetuneRequest
from shared.settings import Settings


def preview_examples(dataset: Dataset | None, request: FinetuneRequest,
                     settings: Settings) -> tuple[list[ExampleOut], list[str]]:
    """Up to `datasets.FIRST_ROWS` rows of an uploaded `dataset` rendered as the job would
    train on them, and a warning when the model's tokens could not be shown; no examples for
    other sources (their rows are unknown here) or preference pairs (no template)."""
    data = request.data_config
    if dataset is None or is_preference(request.training_config.preference_optimization):
        return [], []
    preview = datasets.preview(dataset, data.prompt_template, datasets.FIRST_ROWS)
    def render(model_path: str | None) -> list[ExampleOut]:
        return render_examples(
            preview, model_path=model_path, prompt_template=data.prompt_template,
            cutoff_len=data.cutoff_len, train_on_inputs=data.train_on_inputs,
            allowed_local_dirs=settings.sources.allowed_local_dirs).examples

    try:
        return render(request.pretrainedmodel_config.model_path), []
    except token_preview.TokenPreviewError as exc:
        return render(None), [f"examples: no tokens shown: {exc}"]
