"""How a fine-tuned model is named to an inference engine: one LoRA adapter name per job.

The API resolves what a tenant calls a model (`ft:…`, a job id) to a job it owns and sends the
engine this name; the engine, embedded or vLLM with Tunery's LoRA resolver, finds the adapter in
storage from the name alone. The name carries no tenant: the API checked that already, and the
engine is reachable by the API only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from shared import storage_keys

ADAPTER_NAME_PREFIX = "tunery-job-"
_ADAPTER_NAME = re.compile(re.escape(ADAPTER_NAME_PREFIX) + r"([0-9a-f-]{1,64})")


def adapter_name(job_id: str) -> str:
    """The engine's name for the adapter a completed job exported."""
    return ADAPTER_NAME_PREFIX + job_id


def job_of_adapter(name: str) -> str | None:
    """The job id an adapter name stands for; None when `name` is no adapter name."""
    match = _ADAPTER_NAME.fullmatch(name)
    return match.group(1) if match else None


def adapter_keys(job_id: str) -> dict[str, str]:
    """File name -> storage key of the adapter a job exported (peft's two files)."""
    return {name: storage_keys.job_artifact_key(job_id, name)
            for name in storage_keys.ADAPTER_FILES}


def trained_whole_model(payload: Mapping[str, Any]) -> bool:
    """Whether the job of this stored request payload was a full fine-tune (`use_lora`
    false): its artifacts are a whole model, which no engine serves as an adapter."""
    return payload.get("pretrainedmodel_config", {}).get("use_lora", True) is False


def whole_model_not_served(job_id: str) -> str:
    """Why a full fine-tune's model is not served, for the caller."""
    return (f"job {job_id} trained the whole model (use_lora false): the inference engine "
            "serves LoRA adapters on the operator's base models only; download the job's "
            "artifacts (a transformers checkpoint) or export it as GGUF to serve it elsewhere")
