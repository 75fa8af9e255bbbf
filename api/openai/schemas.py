"""OpenAI's fine-tuning objects, field for field as the official `openai` SDK reads them
(`openai.types.fine_tuning`, `openai.types.FileObject`), and the job-creation body it sends.

Requests refuse unknown fields, as the MonsterAPI payload does: a misspelt hyperparameter
would otherwise train with "auto". Fields that are Tunery extensions say so.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

Auto = Literal["auto"]


class _AutoOr:
    """"auto" or a number of `kind` in [low, high] (`(low, high]` without `low_included`),
    refused with one message naming both, where a plain union would list each member's
    complaint under its own path."""

    def __init__(self, kind: type[int] | type[float], low: float, high: float, *,
                 low_included: bool = True) -> None:
        self.kind, self.low, self.high, self.low_included = kind, low, high, low_included
        wanted = "an integer" if kind is int else "a number"
        bound = f"from {low:g}" if low_included else f"above {low:g}"
        self.message = f"must be 'auto' or {wanted} {bound} to {high:g}"

    def check(self, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.kind is int and not isinstance(value, int)):
            raise ValueError(self.message)
        above = value >= self.low if self.low_included else value > self.low
        if not above or value > self.high:
            raise ValueError(self.message)
        return value

    def schema(self) -> dict[str, Any]:
        number: dict[str, Any] = {"type": "integer" if self.kind is int else "number",
                                  "maximum": self.high}
        number["minimum" if self.low_included else "exclusiveMinimum"] = self.low
        return {"anyOf": [{"const": "auto", "type": "string"}, number]}


_BATCH = _AutoOr(int, 1, 256)
_MULTIPLIER = _AutoOr(float, 0, 10, low_included=False)
_EPOCHS = _AutoOr(int, 1, 50)
_BETA = _AutoOr(float, 0, 2, low_included=False)
BatchSize = Annotated[Any, PlainValidator(_BATCH.check), WithJsonSchema(_BATCH.schema())]
LearningRateMultiplier = Annotated[Any, PlainValidator(_MULTIPLIER.check),
                                   WithJsonSchema(_MULTIPLIER.schema())]
Epochs = Annotated[Any, PlainValidator(_EPOCHS.check), WithJsonSchema(_EPOCHS.schema())]
Beta = Annotated[Any, PlainValidator(_BETA.check), WithJsonSchema(_BETA.schema())]
MAX_METADATA_PAIRS = 16
_NUL = "must not contain NUL characters (\\u0000)"
METADATA_KEY = re.compile(r'[^"\\\x00-\x1f\x7f]{1,64}')
"""A metadata key: 1 to 64 characters, no quote, backslash or control character, so that it
names one member in a JSON path (the list filter) whatever the database."""
METADATA_KEY_RULE = "1 to 64 characters without quotes, backslashes or control characters"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(_Body):
    batch_size: BatchSize = Field("auto", description="Examples per optimizer step.")
    learning_rate_multiplier: LearningRateMultiplier = Field(
        "auto", description="Times the base learning rate (README: 'OpenAI dialect').")
    n_epochs: Epochs = Field("auto", description="Passes over the training file.")


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Beta = Field("auto", description="DPO's beta: how far the model may move from the "
                                           "reference (the base without the adapter); auto is 0.1.")


class SupervisedMethod(_Body):
    hyperparameters: SupervisedHyperparameters | None = None


class DpoMethod(_Body):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _block_of_its_type(self) -> Method:
        # A block of another method would be ignored, and its hyperparameters with it.
        others = [name for name in ("supervised", "dpo", "reinforcement")
                  if name != self.type and getattr(self, name) is not None]
        if others:
            raise ValueError(f"type is {self.type!r}, so only a {self.type!r} block may "
                             f"follow it, not {others[0]!r}")
        return self


class WandbIntegration(_Body):
    project: str = Field(min_length=1, max_length=256)
    entity: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)
    tags: list[Annotated[str, StringConstraints(max_length=64)]] | None = Field(
        None, max_length=50)


class Integration(_Body):
    type: Literal["wandb"]
    wandb: WandbIntegration


class JobCreate(_Body):
    """Body of `POST /v1/fine_tuning/jobs`."""

    model: str = Field(min_length=1, max_length=512, description=(
        "The open base model to train: a hub id or a local directory the operator allows "
        "(OpenAI's model names are refused with a suggestion)."))
    training_file: str = Field(min_length=1, max_length=64,
                               description="A file-… id uploaded with purpose fine-tune.")
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: SupervisedHyperparameters | None = Field(
        None, description="Deprecated by OpenAI in favour of `method`; the same thing.")
    method: Method | None = None
    seed: int | None = Field(None, strict=True, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$", description=(
        "Up to 64 letters, digits, '.', '_' and '-': the third ':'-separated segment of "
        "`fine_tuned_model`."))
    metadata: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)],
                   Annotated[str, StringConstraints(max_length=512)]] | None = Field(
        None, description=f"Up to {MAX_METADATA_PAIRS} string pairs, returned with the job "
                          "and usable as a list filter (`metadata[key]=value`).")
    integrations: list[Integration] | None = Field(None, max_length=5)

    @field_validator("metadata")
    @classmethod
    def _few_pairs(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs, not {len(value)}")
        for key, text in value.items():
            if not METADATA_KEY.fullmatch(key):
                raise ValueError(f"key {key[:64]!r}: {METADATA_KEY_RULE}")
            if "\x00" in text:
                raise ValueError(f"value of {key!r} {_NUL}")
        return value

    @field_validator("model", "training_file", "validation_file", "suffix")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError(_NUL)
        return value


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class ModelDeleted(BaseModel):
    """What `DELETE /v1/models/{model}` answers, as OpenAI's `client.models.delete` reads it."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None


class Hyperparameters(BaseModel):
    batch_size: Auto | int
    learning_rate_multiplier: Auto | float
    n_epochs: Auto | int | float = Field(description="Whole epochs, except for a job submitted "
                                         "through the MonsterAPI dialect with a fractional "
                                         "num_train_epochs.")
    beta: Auto | float | None = Field(None, description="DPO jobs only.")


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed",
                    "cancelled", "paused"]
    training_file: str
    validation_file: str | None
    seed: int
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    estimated_finish: int | None
    result_files: list[str]
    error: JobError | None
    hyperparameters: Hyperparameters
    method: dict[str, Any]
    integrations: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    tunery_job_id: str = Field(description="Tunery extension: the same job's id in the "
                                           "MonsterAPI dialect (`/v1/finetune/llm/{id}`).")
    tunery_device_class: str = Field(description="Tunery extension: the device class the job "
                                                 "was routed to (TUNERY_DEVICE_CLASSES).")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics
    download_url: str = Field(description="Tunery extension: the checkpoint's adapter as one "
                                          "tar.gz (adapter weights and config).")


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool
