"""Response bodies. The request body is `shared.schema.FinetuneRequest`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from shared import datasets, token_preview
from shared.models import (
    Dataset,
    Deployment,
    DeploymentEvent,
    DeploymentStatus,
    ExportStatus,
    Job,
    JobExport,
    JobLog,
    JobStatus,
    KeyRole,
)
from shared.payload_secrets import drop_secrets
from shared.schema import ExportRequest, PromptTemplate
from shared.served_models import adapter_name
from shared.tenant_weights import MAX_WEIGHT, MIN_WEIGHT


def _utc(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; Tunery writes them all in UTC. Without the
    # zone the JSON would not be the RFC 3339 date-time the schema promises.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]

MONSTERAPI_STATUS = {
    JobStatus.QUEUED: "IN_QUEUE",
    JobStatus.RUNNING: "IN_PROGRESS",
    # MonsterAPI has no pause; its clients read an unknown status as not finished.
    JobStatus.PAUSED: "PAUSED",
    JobStatus.COMPLETED: "COMPLETED",
    JobStatus.FAILED: "FAILED",
    JobStatus.CANCELLED: "TERMINATED",
}
_STATUS_NAMES = {status.value: status for status in JobStatus} | {
    name: status for status, name in MONSTERAPI_STATUS.items()
}


def job_status_named(name: str) -> JobStatus:
    """The status `name` stands for: one of ours or MonsterAPI's, in any case."""
    try:
        return _STATUS_NAMES[name.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown status {name!r}; use one of {', '.join(_STATUS_NAMES)} "
                         "(in any case)") from None


class JobOut(BaseModel):
    job_id: str
    deployment_id: str = Field(description="The same id, under the name MonsterAPI clients use.")
    tenant_id: str = Field(description="The tenant that owns the job (an admin key lists "
                                       "every tenant's).")
    status: JobStatus
    monsterapi_status: str = Field(description="IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED or "
                                               "TERMINATED, as MonsterAPI reports it; PAUSED, "
                                               "which MonsterAPI does not have, for a paused "
                                               "job.")
    phase: str | None = Field(None, description="loading_data, loading_model, training or "
                                                "uploading while RUNNING.")
    progress: float
    error: str | None
    base_model: str
    attempt: int
    cancel_requested: bool
    pause_requested: bool = Field(description="A pause asked of a RUNNING job that its worker "
                                              "has not reached yet (it pauses at its next "
                                              "step).")
    result: dict[str, Any] | None
    warnings: list[str] = Field(
        default_factory=list,
        description="What the service changed in the job or doubts about it (a warm-up cut to "
        "fit a short run, the default prompt template used), at submit time or as the worker "
        "found it; never a reason the job failed.",
    )
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    updated_at: UtcDatetime
    artifacts_url: str
    payload: dict[str, Any] = Field(description="The accepted payload, secrets masked.")
    device_class: str = Field(description="Tunery extension: the device class the job was "
                                          "routed to at submit (TUNERY_DEVICE_CLASSES), whose "
                                          "workers alone claim it.")

    @classmethod
    def of(cls, job: Job) -> JobOut:
        status = JobStatus(job.status)
        return cls(
            job_id=job.id,
            deployment_id=job.id,
            tenant_id=job.tenant_id,
            status=status,
            monsterapi_status=MONSTERAPI_STATUS[status],
            phase=job.phase if status is JobStatus.RUNNING else None,
            progress=job.progress,
            error=job.error,
            base_model=job.base_model,
            attempt=job.attempt,
            cancel_requested=job.cancel_requested,
            pause_requested=job.pause_requested,
            result=job.result,
            warnings=job.warnings or [],
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            artifacts_url=f"/v1/finetune/llm/{job.id}/artifacts",
            payload=drop_secrets(job.payload),
            device_class=job.device_class,
        )


class JobSubmitted(BaseModel):
    job_id: str
    deployment_id: str
    status: JobStatus
    message: str


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class LogLineOut(BaseModel):
    id: int = Field(description="Grows with every line the job writes: pass the last one seen "
                                "as `after` to read only newer lines.")
    at: UtcDatetime = Field(description="When the line was written.")
    attempt: int = Field(description="The attempt that wrote it; a re-queued job counts on.")
    line: str


class LogsOut(BaseModel):
    job_id: str
    deployment_id: str
    status: JobStatus
    logs: list[str] = Field(description="The lines' text, as MonsterAPI clients read it.")
    lines: list[LogLineOut] = Field(description="The same lines, each with its id, time and "
                                                "attempt, oldest first.")
    next_after: int = Field(description="The id of the last line here (with none, the `after` "
                                        "asked for, or 0): pass it as `after` next time.")

    @classmethod
    def of(cls, job: Job, rows: Sequence[JobLog], after: int | None) -> LogsOut:
        lines = [LogLineOut(id=r.id, at=r.at, attempt=r.attempt, line=r.line) for r in rows]
        return cls(job_id=job.id, deployment_id=job.id, status=JobStatus(job.status),
                   logs=[line.line for line in lines], lines=lines,
                   next_after=lines[-1].id if lines else after or 0)


class MetricOut(BaseModel):
    step: int
    attempt: int
    at: UtcDatetime
    values: dict[str, float]


class StatusChangeOut(BaseModel):
    """A job's move to a status (a row of its audit trail), as its stream sends it."""

    from_status: JobStatus | None = Field(description="Null for the job's creation.")
    to_status: JobStatus
    attempt: int = Field(description="The attempt the move belongs to; 0 before the first.")
    reason: str | None
    at: UtcDatetime


class StreamEndOut(BaseModel):
    status: JobStatus = Field(description="The job's final status.")


class MetricsOut(BaseModel):
    job_id: str
    metrics: list[MetricOut]


class ArtifactOut(BaseModel):
    name: str
    size: int
    download_url: str


class ArtifactsOut(BaseModel):
    job_id: str
    status: JobStatus
    artifacts: list[ArtifactOut]
    archive_url: str | None = Field(
        None, description="Every artifact in one tar.gz that unpacks into a folder "
        "'{job_id}-adapter'; null until the job has completed with artifacts."
    )


class ExportOut(BaseModel):
    export_id: str
    job_id: str
    format: str = Field(description="'merged' or 'gguf'.")
    quantization: str | None = Field(description="'f16' or 'q8_0' for a GGUF export.")
    status: ExportStatus
    error: str | None = Field(description="Why it FAILED; asking for it again retries it.")
    artifacts: list[str] = Field(
        description="Once COMPLETED: the artifact names of its files, each downloadable at "
        "`GET /v1/finetune/llm/{job_id}/artifacts/{name}` (a GGUF export: the .gguf file and "
        "an Ollama `Modelfile`).")
    created_at: UtcDatetime
    finished_at: UtcDatetime | None

    @classmethod
    def of(cls, export: JobExport) -> ExportOut:
        spec = ExportRequest.of_kind(export.kind)
        return cls(
            export_id=export.id, job_id=export.job_id, format=spec.format,
            quantization=spec.quantization, status=ExportStatus(export.status),
            error=export.error, artifacts=list(export.files or []),
            created_at=export.created_at, finished_at=export.finished_at,
        )


class ExportsOut(BaseModel):
    job_id: str
    exports: list[ExportOut]


class TerminateIn(BaseModel):
    model_config = {"extra": "forbid"}

    deployment_id: str = Field(min_length=1, max_length=64)
    actor: str = Field("user", max_length=64)


class DeploymentOut(BaseModel):
    """A deployment (`POST /v1/deploy/llm`): a completed job's adapter behind an
    OpenAI-compatible endpoint."""

    deployment_id: str = Field(description="`dep-` and a uuid: never a job id.")
    deployment_name: str = Field(description="The name given at deploy time, or the id.")
    tenant_id: str
    status: DeploymentStatus = Field(description="live: answers chat requests; TERMINATED: "
                                                 "answers no more.")
    URL: str = Field(description="The endpoint, MonsterAPI's name for it: an OpenAI base URL. "
                                 "`OpenAI(base_url=URL, api_key=<your key>)` then "
                                 "`chat.completions.create(model=<anything>, messages=...)`.")
    job_id: str = Field(description="The job whose adapter it serves (loramodel_path).")
    adapter: str = Field(description="The adapter's name at the inference engine.")
    basemodel_path: str = Field(description="The job's base model.")
    prompt_template: str
    max_model_len: int | None = Field(description="Context length asked at deploy time; null: "
                                                  "the base model's own.")
    requests_served: int = Field(description="Chat requests the endpoint has answered.")
    last_request_at: UtcDatetime | None
    created_at: UtcDatetime
    terminated_at: UtcDatetime | None
    payload: dict[str, Any] = Field(description="The deploy payload as accepted, defaults "
                                                "filled in, api_auth_token left out.")

    @classmethod
    def of(cls, deployment: Deployment, base_url: str) -> DeploymentOut:
        """`base_url`: the API's own, as the client reached it (the request's)."""
        return cls(
            deployment_id=deployment.id,
            deployment_name=deployment.name,
            tenant_id=deployment.tenant_id,
            status=DeploymentStatus(deployment.status),
            URL=f"{base_url.rstrip('/')}/v1/deployments/{deployment.id}",
            job_id=deployment.job_id,
            adapter=adapter_name(deployment.job_id),
            basemodel_path=deployment.base_model,
            prompt_template=deployment.prompt_template,
            max_model_len=deployment.max_model_len,
            requests_served=deployment.requests_served,
            last_request_at=deployment.last_request_at,
            created_at=deployment.created_at,
            terminated_at=deployment.terminated_at,
            payload=deployment.payload,
        )


class DeploymentLineOut(BaseModel):
    id: int = Field(description="Pass the last one seen as `after` to read only newer lines.")
    at: UtcDatetime
    line: str


class DeploymentLogsOut(BaseModel):
    deployment_id: str
    status: DeploymentStatus
    logs: list[str] = Field(description="The lines' text, as MonsterAPI clients read it: "
                                        "created, live, terminated.")
    lines: list[DeploymentLineOut] = Field(description="The same lines with id and time, "
                                                       "oldest first.")
    next_after: int = Field(description="The id of the last line here (with none, the `after` "
                                        "asked for, or 0).")

    @classmethod
    def of(cls, deployment: Deployment, rows: Sequence[DeploymentEvent],
           after: int | None) -> DeploymentLogsOut:
        lines = [DeploymentLineOut(id=r.id, at=r.at, line=r.line) for r in rows]
        return cls(deployment_id=deployment.id, status=DeploymentStatus(deployment.status),
                   logs=[line.line for line in lines], lines=lines,
                   next_after=lines[-1].id if lines else after or 0)


class DeployList(JobList):
    """`GET /v1/deploy/list`: the jobs, as MonsterAPI's client lists them, and beside them
    the deployments, paged by the same limit and offset."""

    deployments: list[DeploymentOut]
    deployments_total: int


class DatasetOut(BaseModel):
    id: str = Field(description="Pass it as data_config.data_path to train on this dataset.")
    tenant_id: str = Field(description="The tenant that owns the dataset.")
    name: str
    status: str = Field(description="ready; pending while an upload URL waits for its PUT; "
                                    "failed (see error) when the file was rejected.")
    format: str | None = Field(description="jsonl, json, csv or parquet.")
    csv_delimiter: str | None = Field(
        description="The delimiter a CSV file was read with, told from its header line: "
        "',', ';' or a tab ('\\t'); a comma when the header line leaves it in doubt. Null for "
        "other formats."
    )
    size_bytes: int | None
    rows: int | None
    columns: list[str] | None
    first_rows: list[dict[str, Any]] = Field(
        description=f"Up to the first {datasets.FIRST_ROWS} rows; cells longer than "
        f"{datasets.MAX_SAMPLE_CELL_CHARS} characters are cut and end with '…'."
    )
    error: str | None
    created_at: UtcDatetime

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetOut:
        return cls(
            id=dataset.id,
            tenant_id=dataset.tenant_id,
            name=dataset.name,
            status=dataset.status,
            format=dataset.format,
            csv_delimiter=dataset.csv_delimiter,
            size_bytes=dataset.size_bytes,
            rows=dataset.rows,
            columns=dataset.columns,
            first_rows=datasets.first_rows(dataset),
            error=dataset.error,
            created_at=dataset.created_at,
        )


class DatasetList(BaseModel):
    items: list[DatasetOut]
    total: int
    limit: int
    offset: int


class PreviewIn(BaseModel):
    model_config = {"extra": "forbid"}

    prompt_template: PromptTemplate = Field(min_length=1, max_length=16384,
                                 description="The template a job would use.")
    n: int = Field(datasets.FIRST_ROWS, ge=1, le=datasets.SAMPLE_ROWS, strict=True,
                   description="How many of the first rows to render.")
    model_path: str | None = Field(
        None, min_length=1, max_length=512,
        description="A local model folder (inside TUNERY_ALLOWED_LOCAL_DIRS, checked as a job's "
        "model_path is) whose tokenizer.json and chat template render each example's "
        "`tokens`: what the job trains on and what cutoff_len cuts. A hub id gets the text "
        "preview only: the API downloads no model.")
    cutoff_len: int = Field(512, gt=0, le=32768, strict=True,
                            description="The job's data_config.cutoff_len; used with model_path.")
    train_on_inputs: bool = Field(False, description="The job's data_config.train_on_inputs; "
                                                     "used with model_path.")


class TokenOut(BaseModel):
    position: int = Field(description="Index in the example's tokens.")
    id: int
    text: str = Field(description="The characters the token covers; a special token that "
                                  "covers none (BOS, an appended EOS) shows as itself.")
    trained: bool = Field(description="The loss is computed on this token.")


class TextPartOut(BaseModel):
    text: str
    kind: Literal["trained", "ignored", "cut"] = Field(
        description="trained: the loss is computed on it; ignored: the model reads it, no "
        "loss; cut: past cutoff_len, the model never sees it.")


class TokensOut(BaseModel):
    """An example as the job would train on it, rendered and tokenized with model_path's
    tokenizer (in chat mode, through its chat template)."""

    parts: list[TextPartOut] = Field(description="The rendered text in consecutive parts of "
                                                 "one kind, at most "
                                                 f"{token_preview.SHOWN_TEXT_CHARS} characters.")
    text_cut: bool = Field(description="`parts` show only the start of the text.")
    token_count: int = Field(description="Tokens of the rendered example, the EOS a "
                                         "prompt-template example ends with included.")
    kept_tokens: int = Field(description="The first tokens the model sees: at most cutoff_len.")
    trained_tokens: int = Field(description="Kept tokens the loss is computed on.")
    first_tokens: list[TokenOut] = Field(description=f"The first {token_preview.SHOWN_TOKENS} "
                                                     "kept tokens.")
    last_tokens: list[TokenOut] = Field(description="The last kept tokens not among "
                                                    f"first_tokens, at most "
                                                    f"{token_preview.SHOWN_TOKENS}.")
    dropped: bool = Field(description="No trained token within cutoff_len: the job leaves "
                                      "this example out.")
    render_cut: bool = Field(description="The row is longer than the preview renders; "
                                         "token_count counts only its start.")

    @classmethod
    def of(cls, row: token_preview.TokenizedRow) -> TokensOut:
        return cls.model_validate(row, from_attributes=True)


class ExampleOut(BaseModel):
    prompt: str = Field(description=f"At most {datasets.PREVIEW_PART_CHARS} characters; "
                                    "`prompt_cut` says when more were left out. In chat mode, "
                                    "the turns before the last assistant turn as 'role: "
                                    "content' lines, then 'assistant: '.")
    completion: str = Field(description="The part the loss is computed on: the last "
                                        "placeholder's value and the text after it (in chat "
                                        "mode: the last assistant turn; every assistant turn "
                                        "is trained); at most "
                                        f"{datasets.PREVIEW_PART_CHARS} characters.")
    prompt_cut: bool = Field(False, description="The prompt is longer than shown.")
    completion_cut: bool = Field(False, description="The completion is longer than shown.")
    problem: str | None = Field(None, description="Why a job would fail on this row or leave "
                                                  "it out; null when it trains.")
    tokens: TokensOut | None = Field(None, description="With a local model_path: the example "
                                                       "as the job tokenizes it.")


class PreviewOut(BaseModel):
    dataset_id: str
    placeholders: list[str]
    missing_columns: list[str] = Field(description="Placeholders the dataset has no column for; "
                                                   "a job with this template would be refused.")
    message: str = Field(description=f"At most {datasets.PREVIEW_MESSAGE_CHARS} characters.")
    examples: list[ExampleOut]


class UploadUrlOut(BaseModel):
    upload_url: str = Field(description="PUT the file's bytes here (no API key needed).")
    download_url: str = Field(
        description="The dataset id: pass it as data_config.data_path (with data_source_type "
        "s3_presigned_link, as MonsterAPI clients do, or hub_link)."
    )
    dataset_id: str
    expires_in: int = Field(description="Seconds the upload_url stays valid.")


class CallerOut(BaseModel):
    """The API key a request was sent with: what a client checks before it starts work."""

    key_id: str
    key_prefix: str = Field(description="The key's public part: `tunery keys revoke "
                                        "<prefix>` revokes it.")
    key_name: str
    role: KeyRole = Field(description="member: its tenant's jobs and datasets; admin: every "
                                      "tenant's.")
    tenant_id: str = Field(description="The tenant that owns what this key submits and "
                                       "uploads.")
    rate_limit_per_minute: int = Field(description="Requests per minute this key may send to "
                                                   "each API process; 0: no limit.")
    max_active_jobs: int = Field(description="Queued plus running jobs the tenant may have; "
                                             "0: no limit.")


class TenantWeightIn(BaseModel):
    model_config = {"extra": "forbid"}

    # Strict: a number, not "2" nor true, which pydantic would otherwise take for 2.0 and 1.0.
    weight: float = Field(ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False, strict=True,
                          description="The tenant's share of the workers, relative to other "
                                      "tenants' (default 1): a free worker claims from the "
                                      "tenant with the fewest running jobs per unit of weight.")


class TenantWeightOut(BaseModel):
    tenant_id: str
    name: str
    weight: float = Field(description="The tenant's share of the workers (default 1).")


class PreflightDataset(BaseModel):
    kind: Literal["uploaded", "local", "url", "hub"] = Field(
        description="uploaded: a `ds_…` id of yours; local: a file on this server; url: an "
        "https (or allowed http) URL; hub: a Hugging Face hub dataset.")
    data_path: str = Field(description="As given; a URL without its query string.")
    checked: str = Field(description="What the preflight checked, or why it could not.")
    rows: int | None = Field(description="Known for uploaded datasets; null: unknown until "
                                         "the worker reads it.")
    train_rows: int | None = Field(description="Rows the split gives to training.")
    validation_rows: int | None = Field(description="Rows the split keeps for validation, or "
                                        "the rows of data_config.validation_data_path.")
    columns: list[str] | None
    format: str | None = Field(description="jsonl, json, csv or parquet, where known.")
    csv_delimiter: str | None = Field(description="The delimiter a CSV is read with, where "
                                                  "known.")


class PreflightModel(BaseModel):
    kind: Literal["local", "hub"]
    model_path: str
    checked: str = Field(description="What the preflight checked, or why it could not.")


class PreflightTemplate(BaseModel):
    mode: Literal["template", "chat", "orpo", "dpo"] = Field(
        description="template: rows rendered with prompt_template; chat: `{messages}` turns; "
        "orpo, dpo: preference pairs (the prompt / chosen / rejected columns or OpenAI's "
        "preference format, as `columns` says), prompt_template unused.")
    prompt_template: str
    is_default: bool = Field(description="prompt_template was left out: the default one, "
                                          "written for tatsu-lab/alpaca, is used.")
    columns: list[str] = Field(description="The dataset columns the job reads.")


class PreflightSteps(BaseModel):
    train_examples: int | None = Field(description="null: unknown until the worker reads "
                                                   "the dataset.")
    batch_size: int = Field(description="Examples per micro-batch.")
    gradient_accumulation_steps: int
    num_train_epochs: float
    optimizer_steps: int | None = Field(description="Before examples longer than cutoff_len "
                                                    "are dropped; null when rows are unknown.")
    warmup_steps_asked: int
    warmup_steps: int | None = Field(description="The warm-up the run uses: a warm-up from "
                                                 "half the run is cut to a tenth of it; 0 "
                                                 "with constant and reduce_lr_on_plateau, "
                                                 "which have none.")
    warmup_warning: str | None = Field(None, description="Why the warm-up was cut or takes a "
                                                         "large share of the run (also in "
                                                         "`warnings`).")
    note: str | None = Field(None, description="Why a number is unknown, or not used.")


class PreflightDeviceClass(BaseModel):
    """The device class the job goes to (TUNERY_DEVICE_CLASSES): the smallest with enough
    devices and, where the model's size is known, enough memory per device."""

    name: str = Field(description="The class, and the queue the job waits in.")
    devices: int = Field(description="Devices each worker of the class owns.")
    memory_gb: float | None = Field(description="Memory of each of its devices, in GB; null: "
                                                "not stated.")
    memory_needed_gb: float | None = Field(description="The memory per device the job was "
                                                       "estimated to need; null: not known.")
    estimate: str = Field(description="How the memory was estimated, or why it was not.")


class PreflightOut(BaseModel):
    """`POST /v1/finetune/llm?dry_run=true`: what a submit of the same body would train, and
    what to double-check. Nothing is created; any problem is a 422 instead."""

    ok: bool = Field(description="true: a submit of this body would be queued.")
    dataset: PreflightDataset
    model: PreflightModel
    template: PreflightTemplate
    steps: PreflightSteps
    device_class: PreflightDeviceClass
    warnings: list[str] = Field(description="Defaults the payload relies on, a warm-up that "
                                            "takes much of the run, few examples, a CSV "
                                            "delimiter other than ',', sources not checked.")
    examples: list[ExampleOut] = Field(description="The first rows rendered as the job "
                                                   "would train on them (uploaded datasets "
                                                   "only).")
