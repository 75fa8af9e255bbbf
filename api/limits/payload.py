"""Operator limits on a job's payload, from settings.

The schema's own Field bounds are what any Tunery accepts; these are what this server's
operator allows, so they are checked at submit instead of being baked into the schema (and
into OpenAPI) at import time.
"""

from __future__ import annotations

from shared.schema import DataConfig, PretrainedModelConfig, TrainingConfig
from shared.settings import Settings


def payload_limit_problems(
    settings: Settings, *, model: PretrainedModelConfig | None, data: DataConfig | None,
    training: TrainingConfig | None,
) -> list[dict[str, str]]:
    """Every field above its operator limit, as error fields; a section that is None (it did
    not pass the schema) is not looked at."""
    checks: list[tuple[str, float, float, str]] = []
    if data is not None:
        checks.append(("data_config.cutoff_len", data.cutoff_len,
                       settings.limits.max_cutoff_len, "TUNERY_MAX_CUTOFF_LEN"))
    if training is not None:
        checks.append(("training_config.num_train_epochs", training.num_train_epochs,
                       settings.limits.max_epochs, "TUNERY_MAX_EPOCHS"))
    if model is not None:
        checks.append(("pretrainedmodel_config.lora_r", model.lora_r,
                       settings.limits.max_lora_r, "TUNERY_MAX_LORA_R"))
    return [
        {"path": path, "message": f"{value:g} is above this server's limit of {limit:g} "
                                  f"({setting})"}
        for path, value, limit, setting in checks
        if value > limit
    ]
