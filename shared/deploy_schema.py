"""MonsterAPI's deploy payload (`POST /v1/deploy/llm`), field for field.

Names mirror the public `monsterapi` client's `LLMServingParams` (`monsterapi/deployDataModels.py`,
version 1.0.9.3), which `client.deploy("llm", params)` checks and then sends as the caller
wrote it. Every field it has is accepted, so that client never fails here; those that have no
meaning on this server (GPU sizing, image choice, a per-endpoint token) are accepted, checked
for type and ignored, and each says so in its description. Unknown fields are refused
(`extra="forbid"`), as in the fine-tuning payload.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.schema import PromptTemplate

DEFAULT_PROMPT_TEMPLATE = "{prompt}{completion}"
"""MonsterAPI's default for a deployment's prompt_template."""

DEPLOYMENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

IGNORED_FIELDS = ("per_gpu_vram", "gpu_count", "api_auth_token", "use_nightly", "multi_lora")
"""Accepted for the official client and ignored: the engine's hardware and image are the
operator's, and a deployment's endpoint takes the tenant's API key."""

_IGNORED = "Accepted and ignored on this server: "


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deployment_name: str | None = Field(
        None, pattern=DEPLOYMENT_NAME_PATTERN,
        description="A name for the deployment: 1 to 128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit. Left out: the deployment id. Chat requests may send "
        "it (or anything) as `model`.")
    basemodel_path: str | None = Field(
        None, min_length=1, max_length=512,
        description="The base model, as the job named it in pretrainedmodel_config.model_path "
        "(or a name TUNERY_OPENAI_MODEL_ALIASES maps to it). Left out: the job's base.")
    loramodel_path: str | None = Field(
        None, max_length=512,
        description="The adapter to serve: a COMPLETED fine-tuning job of yours, by its id (as "
        "POST /v1/finetune/llm returned it, or `ftjob-…`) or its `ft:…` model name. Hub ids "
        "and URLs are refused: this server deploys its own jobs' adapters only.")
    prompt_template: PromptTemplate = Field(
        DEFAULT_PROMPT_TEMPLATE, min_length=1, max_length=16384,
        description="Template with {column} placeholders, kept with the deployment as "
        "MonsterAPI keeps it; same grammar as a job's prompt_template.")
    max_model_len: int | None = Field(
        None, ge=1, le=1_048_576, strict=True,
        description="Context length in tokens (prompt and completion together) for this "
        "deployment's requests; left out: the base model's own.")
    per_gpu_vram: int | None = Field(None, ge=1, le=100_000, strict=True,
                                     description=_IGNORED + "the engine's GPUs are the "
                                     "operator's.")
    gpu_count: int | None = Field(None, ge=1, le=1024, strict=True,
                                  description=_IGNORED + "the engine's GPUs are the operator's.")
    api_auth_token: str | None = Field(
        None, max_length=1024,
        description=_IGNORED + "the endpoint takes the tenant's API key (Authorization: "
        "Bearer tun_…). Never stored.")
    use_nightly: bool = Field(False, strict=True,
                              description=_IGNORED + "no image is built per deployment.")
    multi_lora: bool = Field(False, strict=True, description=_IGNORED + "the engine always "
                             "serves many adapters on one base.")

    def stored(self) -> dict[str, Any]:
        """The payload as a deployment keeps it: every field but the endpoint token."""
        return self.model_dump(mode="json", exclude={"api_auth_token"})
