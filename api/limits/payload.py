"""Operator limits on a job's payload, from settings.

The schema's own Field bounds are what any Tunery accepts; these are what this server's
operator allows, so they are checked at submit instead of being baked into the schema (and
into OpenAPI) at import time.
"""

from __future__ import annotations

from api.errors import ApiError
from shared.schema import FinetuneRequest
from shared.settings import Settings


def check_payload_limits(request: FinetuneRequest, settings: Settings) -> None:
    """422 naming every field above its operator limit, and the limit."""
    checks = (
        ("data_config.cutoff_len", request.data_config.cutoff_len,
         settings.limits.max_cutoff_len, "TUNERY_MAX_CUTOFF_LEN"),
        ("training_config.num_train_epochs", request.training_config.num_train_epochs,
         settings.limits.max_epochs, "TUNERY_MAX_EPOCHS"),
        ("pretrainedmodel_config.lora_r", request.pretrainedmodel_config.lora_r,
         settings.limits.max_lora_r, "TUNERY_MAX_LORA_R"),
    )
    problems = [
        {"path": path, "message": f"{value:g} is above this server's limit of {limit:g} "
                                  f"({setting})"}
        for path, value, limit, setting in checks
        if value > limit
    ]
    if problems:
        summary = "; ".join(f"{p['path']}: {p['message']}" for p in problems)
        raise ApiError(422, "invalid_request", summary, problems)
