"""How a fine-tuned model is named to an inference engine: one LoRA adapter name per job.

The API resolves what a tenant calls a model (`ft:…`, a job id) to a job it owns and sends the
engine this name; the engine, embedded or vLLM with Tunery's LoRA resolver, finds the adapter in
storage from the name alone. The name carries no tenant: the API checked that already, and the
engine is reachable by the API only.
"""

from __future__ import annotations

import re

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
