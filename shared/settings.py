"""Tunery's settings: `TUNERY_` environment variables in groups, embedded defaults.

With no environment at all, everything lives under one data directory: a SQLite database, a
broker kept in a SQLite file (kombu's `sqla+sqlite` transport, no server), and a local storage
directory. The full stack points the same three URLs at PostgreSQL, Redis and S3.

Each group is a nested model (`settings.limits.max_dataset_rows`). A setting is read from its
flat name (`TUNERY_MAX_DATASET_ROWS`, the name every deployment already uses and the README
documents) or from its nested one (`TUNERY_LIMITS__MAX_DATASET_ROWS`); the nested one wins when
both are set. `LEGACY_NAMES` is the one table from flat names to groups, read for the
environment and for keyword arguments (`Settings(max_dataset_rows=5)`) alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from shared.development_secrets import Secrets, refuse_development_secrets
from shared.device_classes import DeviceClass, default_classes, duplicate_names
from shared.private_files import (
    create_private_sqlite_file,
    make_private_dir,
    sqlite_file,
    tighten_tree,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "TUNERY_"


class DatabaseSettings(BaseModel):
    url: str = Field("", description="SQLAlchemy URL; default: SQLite in data_dir.")
    # SQLAlchemy's default is 5 kept + 10 overflow: the same 15 at most, but under load every
    # request past the fifth concurrent one opened a PostgreSQL connection and closed it
    # again (a backend process started per request). Keeping all 15 costs only idle backends.
    pool_size: int = Field(
        15, ge=1, description="PostgreSQL connections each process may hold; once opened they "
        "stay open for the next request."
    )
    max_overflow: int = Field(
        0, ge=0, description="Connections a process may open beyond pool_size under load, "
        "each closed again as soon as it is given back."
    )
    auto_migrate: bool = Field(True, description="Run `alembic upgrade head` when the API starts.")


class BrokerSettings(BaseModel):
    """The broker, and the device classes whose queues it holds (`shared.device_classes`)."""

    url: str = Field("", description="Celery broker URL; default: SQLite file in data_dir.")
    queue_name: str = Field(
        "train", description="Celery queue of the training tasks when device_classes is "
        "unset: the name of the one default class."
    )
    # Declared after queue_name and before worker_device_class: each validator reads the
    # fields validated before it.
    device_classes: list[DeviceClass] = Field(
        default_factory=list,
        examples=[[{"name": "l4", "devices": 1, "memory_gb": 24},
                   {"name": "a100-x4", "devices": 4, "memory_gb": 80}]],
        description="JSON list of the kinds of worker this deployment runs, each "
        "{\"name\", \"devices\", \"memory_gb\"}: a name (1 to 40 lowercase letters, digits "
        "or '-') that is also the class's Celery queue, the devices each of its workers owns, "
        "and the memory of each device in GB (null: not stated, any model fits). A job goes "
        "to the smallest class with enough devices and memory for it (README, \"Device "
        "classes and routing\"); none: 422. Unset or []: one class named queue_name, 1 "
        "device, memory not stated.",
    )
    worker_device_class: str | None = Field(
        None, description="The device class a worker serves: it consumes that class's queue "
        "alone and claims only that class's jobs, and refuses to start with fewer devices "
        "(TUNERY_WORKER_DEVICES) than the class has. Unset: the first class."
    )

    @field_validator("device_classes")
    @classmethod
    def _unique_names(cls, classes: list[DeviceClass]) -> list[DeviceClass]:
        duplicates = duplicate_names(classes)
        if duplicates:
            raise ValueError(f"class names must be unique (each is a queue); more than one "
                             f"class is named {', '.join(map(repr, duplicates))}")
        return classes

    @field_validator("worker_device_class", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # compose's `${TUNERY_WORKER_DEVICE_CLASS:-}` sets it empty where it means "unset".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("worker_device_class")
    @classmethod
    def _a_known_class(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is None or "device_classes" not in info.data:
            return name  # the default, or the classes are wrong already and say so
        classes = info.data["device_classes"] or default_classes(info.data.get("queue_name",
                                                                               "train"))
        if name not in {c.name for c in classes}:
            raise ValueError(f"{name!r} is not one of the device classes: "
                             + ", ".join(c.describe() for c in classes))
        return name

    @model_validator(mode="after")
    def _default_classes(self) -> BrokerSettings:
        if not self.device_classes:
            self.device_classes = default_classes(self.queue_name)
        if self.worker_device_class is None:
            self.worker_device_class = self.device_classes[0].name
        return self

    def worker_class(self) -> DeviceClass:
        """The class this process serves as a worker (`worker_device_class`)."""
        found = self.class_named(self.worker_device_class or "")
        assert found is not None  # validated
        return found

    def class_named(self, name: str) -> DeviceClass | None:
        """The configured class called `name`; None when there is none (an operator removed
        it after jobs were routed to it)."""
        return next((c for c in self.device_classes if c.name == name), None)


class StorageSettings(BaseModel):
    url: str = Field(
        "", description="file:///abs/dir or s3://bucket/prefix; default: data_dir/storage."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. MinIO's URL.")
    s3_access_key_id: str | None = Field(None, description="S3 access key id.")
    s3_secret_access_key: str | None = Field(None, description="S3 secret access key.")
    s3_public_endpoint_url: str | None = Field(
        None, description="Endpoint used in presigned URLs handed to clients, when it differs "
        "from the one the services use (e.g. http://minio:9000 inside compose)."
    )
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_presign_expiry_s: int = Field(
        3600, description="How long a presigned upload or download URL stays valid."
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="How long one storage request waits to connect to S3."
    )
    read_timeout_s: float = Field(
        15.0, gt=0, description="How long one storage request waits for S3 to answer (each "
        "read of a response); a hung S3 fails a request after it. An API route touching "
        "storage answers 503 storage_unavailable after at most two such waits."
    )
    retry_deadline_s: float = Field(
        300.0, gt=0, description="How long a worker retries an unavailable storage, with "
        "backoff, before it hands its job back to the queue with its last checkpoint. An "
        "outage shorter than this costs the job no step."
    )


class SourceSettings(BaseModel):
    """Where a job's data_path and model_path may point; `UrlPolicy.from_settings` reads it."""

    allowed_local_dirs: list[Path] = Field(
        default_factory=list,
        examples=[["/data/models", "/data/datasets"]],
        description="Directories whose files data_path / model_path may name directly. "
        "Empty: local paths are refused.",
    )
    allow_http_urls: bool = Field(
        False, description="Accept plain http:// data_path URLs (e.g. a MinIO on the same "
        "network); off: https only."
    )
    allowed_private_url_hosts: list[str] = Field(
        default_factory=list,
        examples=[["minio"]],
        description="Hosts (names or IP literals, any port) that data_path URLs may name although "
        "they resolve to loopback, private or link-local addresses, e.g. [\"minio\"]. Empty: "
        "such hosts, and redirects to them, are refused.",
    )

    hub_endpoint: str = Field(
        "", description="The Hugging Face hub whose metadata API the preflight asks whether a "
        "hub model or dataset exists. Empty: HF_ENDPOINT, as the worker reads it, else "
        "https://huggingface.co."
    )
    hub_check_timeout_s: float = Field(
        3.0, gt=0, le=60, description="How long the preflight waits for the hub's answer; "
        "past it the hub id is reported as not checked, not refused."
    )

    @field_validator("allowed_local_dirs")
    @classmethod
    def _absolute(cls, dirs: list[Path]) -> list[Path]:
        return [Path(p).resolve() for p in dirs]

    @field_validator("hub_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("https://", "http://")):
            raise ValueError(f"{value!r} is not an http(s) URL like https://huggingface.co")
        return value.rstrip("/")


class LimitSettings(BaseModel):
    max_dataset_bytes: int = Field(
        1024**3, ge=1, description="Largest dataset file accepted by POST /v1/datasets and "
        "the upload flow; larger ones get 413."
    )
    max_request_bytes: int = Field(
        1024**2, ge=1, description="Largest request body on every route except the dataset "
        "uploads (which allow max_dataset_bytes); larger ones get 413."
    )
    max_dataset_rows: int = Field(
        10_000_000, ge=1, description="Most rows in a dataset: an upload with more gets 413, a "
        "URL or hub dataset with more fails the job. The worker holds neither the rows nor "
        "their tokens in memory (they are read from the file and memory-mapped), so the bound "
        "is the disk's."
    )
    max_row_bytes: int = Field(
        8 * 1024**2, ge=1024, description="Longest row of a dataset file, in bytes: a JSON "
        "line, a CSV record or a JSON array element longer than this is refused (422 at "
        "upload), so parsing holds one row of this size in memory, never a whole file."
    )
    max_tenant_dataset_bytes: int = Field(
        20 * 1024**3, ge=0, description="Bytes of dataset files a tenant may keep; an upload "
        "beyond it gets 413 saying what is used. 0: no limit."
    )
    max_tenant_datasets: int = Field(
        1000, ge=0, description="Datasets (uploaded or waiting for their upload) a tenant may "
        "have; one more gets 413. 0: no limit."
    )
    max_cutoff_len: int = Field(
        8192, ge=1, description="Largest data_config.cutoff_len a job may ask for (422 above)."
    )
    max_epochs: float = Field(
        20, gt=0, description="Largest training_config.num_train_epochs a job may ask for."
    )
    max_lora_r: int = Field(
        256, ge=1, description="Largest pretrainedmodel_config.lora_r a job may ask for."
    )
    rate_limit_per_minute: int = Field(
        120, ge=0, description="Requests per minute per API key on authenticated routes, "
        "counted in each API process (N replicas allow N times as many); 0: no limit, on "
        "job reads either. Reads of one job (below) draw from a budget of their own."
    )
    read_rate_limit_per_minute: int = Field(
        600, ge=0, description="Reads of one job per minute per API key, apart from "
        "rate_limit_per_minute: GET /v1/finetune/llm/{id}, its /logs, /metrics and /stream, "
        "GET /v1/deploy/status/{id} and /v1/deploy/logs/{id} (how the monsterapi client follows "
        "a job), GET /v1/fine_tuning/jobs/{id} and its /events, GET /v1/files/{id}. The "
        "default lets a client poll a job's status and its logs twice a second each (240 a "
        "minute) with room to spare; writes and every other route keep the general limit. "
        "Counted in each API process; 0: no limit on these reads."
    )
    max_active_jobs_per_tenant: int = Field(
        10, ge=0, description="QUEUED plus RUNNING jobs a tenant may have; a submit beyond it "
        "gets 429. 0: no limit."
    )
    auth_failures_per_minute: int = Field(
        30, ge=0, description="Failed authentications (a missing or wrong API key, a wrong "
        "upload token) per minute per client address, in bursts of as many; past it that "
        "address gets 429 instead of 401/403 until the budget refills, while valid keys from "
        "it keep working. Counted in each API process; 0: no limit."
    )
    idempotency_ttl_s: int = Field(
        86400, ge=1, description="How long a submission's Idempotency-Key replays its first "
        "response; an older key starts a new job."
    )


class LeaseSettings(BaseModel):
    """How long a worker's claim on a job lasts, and when a job is given up."""

    lease_seconds: int = Field(
        30, ge=2, description="How long a claim lasts without a heartbeat: how soon a job of a "
        "worker that died unseen (its host gone) goes back to the queue, and how long a running "
        "job rides out a database outage. 15 heartbeats by default, so a renewal slowed by a "
        "busy database or a long step loses nothing."
    )
    heartbeat_seconds: float = Field(
        2.0, gt=0, description="How often a running job renews its lease and looks for a cancel."
    )
    reaper_interval_s: float = Field(
        15.0, gt=0, description="How often each worker re-queues jobs whose lease expired and "
        "re-sends wake-ups for queued jobs the broker lost."
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts per job before a lost worker fails it."
    )
    release_dead_local_workers: bool = Field(
        True, description="A starting worker re-queues at once the jobs leased by worker "
        "processes of its own host (same hostname) that are gone, instead of waiting out their "
        "lease. Turn off where workers in separate pid namespaces share a hostname (containers "
        "with host networking): there a pid says nothing about another container's worker."
    )
    job_soft_time_limit_s: int = Field(
        24 * 3600, ge=1, description="Training time per attempt after which the job saves a "
        "checkpoint and ends FAILED with reason timeout."
    )
    job_hard_time_limit_s: int = Field(
        24 * 3600 + 1800, ge=1, description="Backstop: a job still running this long is failed "
        "by the reaper, and a worker stuck past it exits so its GPU is freed."
    )

    @model_validator(mode="after")
    def _consistent(self) -> LeaseSettings:
        if self.heartbeat_seconds * 2 >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be under half of "
                f"lease_seconds ({self.lease_seconds}), or a slow renewal loses the lease"
            )
        if self.job_hard_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("job_hard_time_limit_s must be above job_soft_time_limit_s")
        return self


class TrainingSettings(BaseModel):
    work_dir: Path | None = Field(
        None, description="Scratch space for worker jobs; default: `work` under the data dir "
        "when it is in use, else under the user's cache dir ($XDG_CACHE_HOME/tunery)."
    )
    checkpoint_every_steps: int = Field(
        50, ge=0, description="Upload a resumable checkpoint every N optimizer steps; 0: never."
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Checkpoints kept in storage per job.")
    training_memory_gb: float | None = Field(
        None, gt=0, description="Memory one training job may use on its device (GPU memory, or "
        "RAM on a CPU worker). Unset: what the device reports free (on CPU also within a "
        "container's cgroup limit). Gradient checkpointing turns on by itself when the "
        "largest batch's activations would not fit.",
    )
    worker_devices: int = Field(
        1, ge=1, le=16, description="Devices this worker owns: a job with "
        "training_config.devices above 1 trains on that many of them as one torchrun process "
        "group (DDP or FSDP; NCCL on GPUs, gloo on CPU). On a GPU host, one per GPU the worker "
        "may use (CUDA_VISIBLE_DEVICES says which); on a CPU worker, processes, each with its "
        "share of the cores. A job asking for more is never claimed here (its device class "
        "routes it elsewhere).",
    )
    process_group_timeout_s: int = Field(
        1800, ge=10, description="How long a rank of a job's process group waits for the "
        "others in a collective (the gradient all-reduce) before the group fails: a rank that "
        "hangs (a stopped process, a stuck GPU) then fails the attempt, which is retried "
        "from its last checkpoint, instead of holding the job forever. Above the longest "
        "step and checkpoint save a job makes.",
    )
    cpu_bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="Training precision of a CPU worker. auto: bf16 mixed precision "
        "where the CPU multiplies bf16 in hardware (AVX512_BF16 or AMX), fp32 elsewhere; on: "
        "always bf16 (emulated, slow, without those instructions); off: always fp32. GPU "
        "workers use bf16, or fp16 where the GPU has no bf16, whatever this says.",
    )
    base_model_cache: bool = Field(
        True, description="Keep the last base model (4-bit for QLoRA) in the worker's memory "
        "between jobs, so that the next job on the same base skips loading it. Off: every job "
        "loads its base and the worker holds no model while idle."
    )
    eval_compute_share: float = Field(
        0.05, gt=0, le=1, description="Share of a job's training compute that all its "
        "evaluations together may cost: each evaluation reads a fixed, seeded sample of the "
        "validation split sized to fit (at least 32 examples). A job's "
        "training_config.max_eval_examples overrides it."
    )
    eval_max_examples: int = Field(
        256, ge=1, description="Most validation examples one evaluation reads, whatever "
        "eval_compute_share allows: the baseline evaluation runs before the first step, so "
        "this bounds how long a large job waits for its first step. A job's "
        "training_config.max_eval_examples overrides it."
    )
    wandb_init_timeout_s: float = Field(
        30.0, gt=0, description="How long a job with logging_config.use_wandb waits for "
        "Weights & Biases to start its run before it fails with a reason that says so."
    )
    wandb_finish_timeout_s: float = Field(
        120.0, gt=0, description="How long a job with logging_config.use_wandb waits for "
        "Weights & Biases to upload the run's last data and stop, after training, before the "
        "worker stops W&B's service process and goes on (the run may then lack its last data)."
    )


class OpenAISettings(BaseModel):
    cutoff_len: int = Field(
        2048, ge=1, description="Tokens per example (data_config.cutoff_len) of jobs created "
        "through the OpenAI dialect, which has no such field: longer examples are cut."
    )
    wandb_api_key: SecretStr | None = Field(
        None, description="The W&B key that OpenAI-dialect jobs with a wandb integration report "
        "with (OpenAI keeps it per organization, not per job). Unset: such jobs are refused."
    )
    result_files_base64: bool = Field(
        True, description="Serve a job's result file (`fine-tune-results`) base64-encoded, as "
        "OpenAI does and its users' code decodes; false: plain CSV."
    )
    model_aliases: dict[str, str] = Field(
        default_factory=dict, description="JSON object from model names clients send (OpenAI's "
        "'gpt-4o-mini-2024-07-18') to the open model this server trains in their place."
    )


class InferenceSettings(BaseModel):
    engine_url: str = Field(
        "http://127.0.0.1:8089", description="The inference engine the API sends chat and "
        "completion requests to: the embedded engine `tunery up` starts (at this port), or an "
        "OpenAI-compatible multi-LoRA server such as vLLM."
    )
    engines: dict[str, str] = Field(
        default_factory=dict, description="JSON object from a base model (as jobs name it) to "
        "the engine serving it, for bases not served at engine_url."
    )
    engine_token: SecretStr | None = Field(
        None, description="Bearer token the API sends to the engines and the embedded engine "
        "requires (vLLM's --api-key). Unset: the engine accepts requests from anyone who can "
        "reach it, so bind it to a private address."
    )
    base_models: list[str] = Field(
        default_factory=list, description="JSON list of base models offered for inference "
        "(listed by GET /v1/models and callable by name) besides tenants' fine-tuned models."
    )
    max_prompt_tokens: int = Field(
        4096, ge=1, description="Longest prompt, in tokens after the chat template, a request "
        "may send."
    )
    max_tokens: int = Field(
        1024, ge=1, description="Largest max_tokens / max_completion_tokens a request may ask."
    )
    max_n: int = Field(4, ge=1, le=128, description="Largest n (choices) a request may ask.")
    timeout_s: float = Field(
        300.0, gt=0, description="How long the API waits for an engine's answer."
    )
    max_adapters: int = Field(
        8, ge=1, description="Embedded engine: LoRA adapters kept loaded; the least recently "
        "used one is unloaded first."
    )
    adapter_memory_mb: int = Field(
        1024, ge=1, description="Embedded engine: memory budget for loaded adapters; the least "
        "recently used ones are unloaded to stay within it."
    )
    max_bases: int = Field(
        1, ge=1, description="Embedded engine: base models kept loaded at once."
    )
    max_batch_size: int = Field(
        8, ge=1, le=256, description="Embedded engine: sequences decoded together in one batch."
    )


class MetricsSettings(BaseModel):
    """Prometheus: who may read the API's /metrics, and where each worker serves its own."""

    token: SecretStr | None = Field(
        None, description="Bearer token GET /metrics requires (Prometheus' "
        "authorization.credentials). Unset: /metrics answers only clients on this machine "
        "(a loopback address), since its job counts span every tenant."
    )
    worker_port: int = Field(
        0, ge=0, le=65535, description="Port on which each worker process serves its own "
        "Prometheus /metrics (jobs, phases, tokens/s, leases, GPU memory). 0: not served."
    )
    worker_host: str = Field(
        "127.0.0.1", description="Address the worker's /metrics listens on; 0.0.0.0 for a "
        "Prometheus on another host or container. It needs no key: it says nothing of a "
        "tenant."
    )

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `TUNERY_METRICS_TOKEN=` (compose's `${VAR:-}`) must not make "" the token that a
        # request without Authorization matches.
        return None if isinstance(value, str) and not value.strip() else value


class WebhookSettings(BaseModel):
    """How job events reach tenants' webhook endpoints (`shared.webhooks`)."""

    timeout_s: float = Field(
        10.0, gt=0, le=120, description="Longest one delivery attempt may take, from connecting "
        "to the response's status line; past it the attempt counts as failed."
    )
    retry_window_s: int = Field(
        72 * 3600, ge=0, description="How long after the event a delivery is retried; then it "
        "is given up (status failed)."
    )
    retry_base_s: float = Field(
        10.0, gt=0, description="The first retry waits up to this long; each next one up to "
        "twice as long as the one before (exponential backoff, full jitter)."
    )
    retry_max_interval_s: float = Field(
        3 * 3600, gt=0, description="The longest wait between two attempts of a delivery."
    )
    secret_rotation_window_s: int = Field(
        24 * 3600, ge=0, description="How long a rotated-out signing secret still signs every "
        "delivery, beside the new one, so receivers can switch without missing one."
    )
    sender_threads: int = Field(
        4, ge=1, le=64, description="Deliveries each worker sends at once: a slow endpoint "
        "holds up one of them only."
    )
    max_in_flight_per_tenant: int = Field(
        2, ge=1, le=64, description="Deliveries of one tenant in flight at once across all "
        "workers' senders, and at most one per endpoint: a tenant's slow receivers never hold "
        "every sender while other tenants' deliveries wait."
    )
    poll_interval_s: float = Field(
        2.0, gt=0, description="How often an idle sender looks for deliveries that are due."
    )
    history_days: int = Field(
        30, ge=1, description="How long delivered and given-up deliveries, and their attempts, "
        "stay listed before the maintenance sweep deletes them."
    )


class RetentionSettings(BaseModel):
    """How long finished jobs keep their stored files (`shared.retention`); off by default.

    Only files go: the job, its logs and metrics stay listed. Each maintenance sweep removes
    at most `batch` jobs' files per kind, oldest finished first.
    """

    checkpoint_days: int | None = Field(
        None, ge=1, description="Days after a COMPLETED, FAILED or CANCELLED job finished "
        "that its checkpoints are removed; unset: kept until the job is deleted."
    )
    artifact_days: int | None = Field(
        None, ge=1, description="Days after a job finished that its artifacts (adapter, "
        "tokenizer, exports) are removed; unset: kept until the job is deleted. A job with a "
        "live deployment keeps them."
    )
    batch: int = Field(
        100, ge=1, le=10_000, description="Jobs whose files one maintenance sweep removes, "
        "per kind; the rest wait for the next sweep."
    )


class StreamSettings(BaseModel):
    """How the API follows a job for its event streams (`GET /v1/finetune/llm/{id}/stream`)."""

    poll_s: float = Field(
        1.0, gt=0, le=60, description="How often an open stream reads the job's new rows; "
        "each read takes a database connection for one short query and gives it back."
    )
    heartbeat_s: float = Field(
        15.0, gt=0, le=3600, description="Longest silence on an open stream: a `: ping` comment "
        "is sent after it so that proxies keep the connection (checked at each poll)."
    )
    max_per_key: int = Field(
        16, ge=1, le=10_000, description="Streams one API key may hold open at once in one API "
        "process; the next is a 429. A dashboard tab or `tunery watch` holds one."
    )
    read_threads: int = Field(
        4, ge=1, le=64, description="Threads, and so database connections, that all of an API "
        "process's open streams read with at once: many streams read more slowly, and never "
        "take the threads and connections other requests need."
    )


GROUPS: dict[str, type[BaseModel]] = {
    "database": DatabaseSettings,
    "broker": BrokerSettings,
    "storage": StorageSettings,
    "sources": SourceSettings,
    "limits": LimitSettings,
    "leases": LeaseSettings,
    "training": TrainingSettings,
    "openai": OpenAISettings,
    "inference": InferenceSettings,
    "metrics": MetricsSettings,
    "webhooks": WebhookSettings,
    "stream": StreamSettings,
    "retention": RetentionSettings,
}

# Flat name (as in `TUNERY_<NAME>` and in keyword arguments) -> (group, field). Every grouped
# field has exactly one entry, so every name that worked before the grouping still does.
LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "database_url": ("database", "url"),
    "db_pool_size": ("database", "pool_size"),
    "db_max_overflow": ("database", "max_overflow"),
    "auto_migrate": ("database", "auto_migrate"),
    "broker_url": ("broker", "url"),
    "queue_name": ("broker", "queue_name"),
    "device_classes": ("broker", "device_classes"),
    "worker_device_class": ("broker", "worker_device_class"),
    "storage_url": ("storage", "url"),
    **{f"storage_{name}": ("storage", name) for name in (
        "connect_timeout_s", "read_timeout_s", "retry_deadline_s",
    )},
    **{name: ("storage", name) for name in (
        "s3_endpoint_url", "s3_access_key_id", "s3_secret_access_key",
        "s3_public_endpoint_url", "s3_region", "s3_presign_expiry_s",
    )},
    **{name: (group, name) for group in ("sources", "limits", "leases", "training")
       for name in GROUPS[group].model_fields},
    **{f"openai_{name}": ("openai", name) for name in OpenAISettings.model_fields},
    **{f"inference_{name}": ("inference", name) for name in InferenceSettings.model_fields},
    "metrics_token": ("metrics", "token"),
    "worker_metrics_port": ("metrics", "worker_port"),
    "worker_metrics_host": ("metrics", "worker_host"),
    **{f"webhook_{name}": ("webhooks", name) for name in WebhookSettings.model_fields},
    **{f"stream_{name}": ("stream", name) for name in StreamSettings.model_fields},
    "retention_days": ("retention", "checkpoint_days"),
    "artifact_retention_days": ("retention", "artifact_days"),
    "retention_batch": ("retention", "batch"),
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", env_file=None, extra="ignore"
    )

    data_dir: Path = Field(
        PROJECT_ROOT / "data", description="Root for the embedded database, broker and storage."
    )
    secret_key: SecretStr | None = Field(
        None, description="Fernet key(s), comma-separated (the first encrypts, all decrypt), "
        "for the secrets stored in job payloads (hf_token, wandb_login_key). The API and every "
        "worker need the same one. Unset: generated once into data_dir/secret.key (mode 0600); "
        "required when the database, broker and storage are all servers and TUNERY_DATA_DIR "
        "is unset."
    )
    dev_secrets: bool = Field(
        False, description="Accept the development defaults of the compose files' secrets "
        "(the fixed secret key, MinIO's and PostgreSQL's passwords, the engine and metrics "
        "tokens); off: the API and workers refuse to start with any of them."
    )
    log_level: str = Field("INFO", description="Log level of the API and the workers.")

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    sources: SourceSettings = Field(default_factory=SourceSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    leases: LeaseSettings = Field(default_factory=LeaseSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, LenientEnvSource(settings_cls), LegacyEnvSource(settings_cls),
                dotenv_settings, file_secret_settings)

    @model_validator(mode="before")
    @classmethod
    def _group_flat_names(cls, data: Any) -> Any:
        """`Settings(max_dataset_rows=5)` sets `limits.max_dataset_rows`: a flat keyword wins
        over the same setting from the environment, as any keyword does."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for flat in [key for key in data if key in LEGACY_NAMES]:
            group, field = LEGACY_NAMES[flat]
            values = data.get(group) or {}
            if isinstance(values, BaseModel):
                values = values.model_dump(exclude_unset=True)
            data[group] = {**values, field: data.pop(flat)}
        return data

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """As pydantic's, but a flat name in `update` is refused: model_copy does not validate,
        so `update={"cpu_bf16": ...}` would set a stray attribute and change nothing."""
        stray = sorted(set(update or ()) - set(type(self).model_fields))
        if stray:
            raise ValueError(f"not settings fields: {stray}; copy the group instead, e.g. "
                             "update={'training': s.training.model_copy(update={...})}")
        return super().model_copy(update=update, deep=deep)

    @field_validator("data_dir")
    @classmethod
    def _resolved(cls, data_dir: Path) -> Path:
        # Here, not by assignment in _embedded_defaults: an assignment would count as set,
        # and whether TUNERY_DATA_DIR was set decides whether the data dir is used.
        return data_dir.resolve()

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        data = self.data_dir
        if not self.database.url:
            self.database.url = f"sqlite:///{data / 'tunery.db'}"
        if not self.broker.url:
            self.broker.url = f"sqla+sqlite:///{data / 'broker.db'}"
        if not self.storage.url:
            self.storage.url = (data / "storage").as_uri()
        if self.training.work_dir is None:
            self.training.work_dir = self.local_files_dir() / "work"
        if self.secret_key is None and not self._embedded_parts_in_data_dir():
            raise ValueError(
                "TUNERY_SECRET_KEY: must be set when the database, broker and storage are all "
                "servers and TUNERY_DATA_DIR is unset (the API and every worker need the same "
                "key); generate one with python -c \"from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())\""
            )
        refuse_development_secrets(Secrets(
            secret_key=_plain(self.secret_key),
            database_url=self.database.url,
            s3_secret_access_key=self.storage.s3_secret_access_key,
            engine_token=_plain(self.inference.engine_token),
            metrics_token=_plain(self.metrics.token),
        ), allowed=self.dev_secrets)
        return self

    def uses_data_dir(self) -> bool:
        """Whether files of this process belong in the data dir: TUNERY_DATA_DIR was set, or
        the SQLite database, the embedded broker, local storage or the generated secret key
        file lives there. With everything on servers and TUNERY_SECRET_KEY set, none does,
        and no data dir is created (its default lies inside the code tree)."""
        return self.secret_key is None or self._embedded_parts_in_data_dir()

    def _embedded_parts_in_data_dir(self) -> bool:
        if "data_dir" in self.model_fields_set:
            return True
        local = [sqlite_file(self.database.url), sqlite_file(self.broker.url),
                 local_storage_dir(self.storage.url)]
        return any(path is not None and path.resolve().is_relative_to(self.data_dir)
                   for path in local)

    def local_files_dir(self) -> Path:
        """Where this process keeps files of its own beside the embedded parts (job scratch,
        tenants' private hub caches): the data dir when it is in use, else the user's cache
        dir, so that a stack on servers writes nothing into the code tree."""
        if self.uses_data_dir():
            return self.data_dir
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache).resolve() / "tunery"


def _plain(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


class LenientEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, except that a value which should be JSON and is
    not goes on as the string it is. Validation then reports it beside every other problem,
    under its field's name, where the stock source stops at the first one with a SettingsError
    that names neither the variable nor the value."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


class LegacyEnvSource(PydanticBaseSettingsSource):
    """Reads the flat `TUNERY_<NAME>` variables of `LEGACY_NAMES` into their groups, parsed as
    pydantic-settings parses any variable (JSON for lists)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._env = LenientEnvSource(_flat_model(), env_prefix=ENV_PREFIX, case_sensitive=False)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is read in __call__

    def __call__(self) -> dict[str, Any]:
        grouped: dict[str, dict[str, Any]] = {}
        for flat, value in self._env().items():
            group, field = LEGACY_NAMES[flat]
            grouped.setdefault(group, {})[field] = value
        return grouped


@lru_cache(maxsize=1)
def _flat_model() -> type[BaseSettings]:
    """A model with one field per flat name, typed as its grouped field, so that the
    environment source knows which values to decode as JSON."""
    fields: dict[str, Any] = {
        flat: (GROUPS[group].model_fields[field].annotation, None)
        for flat, (group, field) in LEGACY_NAMES.items()
    }
    return create_model("FlatSettings", __base__=BaseSettings, **fields)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process; tests call `get_settings.cache_clear()` after setenv."""
    settings = Settings()
    prepare_data_dir(settings)
    return settings


def local_storage_dir(storage_url: str) -> Path | None:
    """The directory of a `file:///abs/dir` storage URL; None for other stores."""
    parts = urlsplit(storage_url)
    return Path(url2pathname(parts.path)) if parts.scheme == "file" else None


def prepare_data_dir(settings: Settings) -> None:
    """Create the data dir (0700), when something uses it, and the SQLite files (0600) before
    anything opens them, and take group/other permissions off whatever an older version left
    in it."""
    if settings.uses_data_dir():
        make_private_dir(settings.data_dir)
        tighten_tree(settings.data_dir)
    create_private_sqlite_file(settings.database.url)
    # An embedded broker (kombu's sqla+sqlite transport) is one more SQLite file in data_dir.
    if settings.broker.url.startswith("sqla+"):
        create_private_sqlite_file(settings.broker.url)


def settings_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per invalid setting in the environment (nothing when they are all valid), for
    the command line to print before it starts anything."""
    try:
        Settings()
    except (ValidationError, SettingsError) as exc:
        return settings_error_lines(exc, environ)
    return []


# Values of these settings are never repeated in an error line.
_UNECHOED = ("secret", "access_key", "token")
_LONGEST_ECHO = 120
_BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def settings_error_lines(exc: ValidationError | SettingsError,
                         environ: Mapping[str, str] | None = None) -> list[str]:
    """`exc` as one line per problem: the variable to fix, the form it expects and the value
    it holds, e.g. `TUNERY_ALLOWED_LOCAL_DIRS: expected a JSON list such as '["/data"]', got
    '/data'`. Secret values are not repeated."""
    env = {name.upper(): value for name, value in (os.environ if environ is None
                                                   else environ).items()}
    if isinstance(exc, SettingsError):
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        return [f"settings: {exc}{cause}"]
    lines = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc:  # a rule across settings: its message names the variables itself
            lines.append(message)
            continue
        if len(loc) == 1 and loc[0] in GROUPS:
            lines.append(f"{_group_variables(loc[0], env)}: {message}")
            continue
        variable = _variable_name(loc, env)
        # `TUNERY_DEVICE_CLASSES: item 0 devices: ...`: the list's item, and its key.
        item = f" item {' '.join(loc[2:])}:" if len(loc) > 2 else ""
        expected = _expected_form(loc, error["type"], message)
        lines.append(f"{variable}:{item} {expected}{_echo(variable, loc, error, env)}")
    return lines


def _variable_name(loc: tuple[str, ...], env: Mapping[str, str]) -> str:
    """The variable a user set for the setting at `loc`: the nested name when it is set (it
    wins), else the flat one."""
    if loc[0] not in GROUPS or len(loc) < 2:
        return f"{ENV_PREFIX}{loc[0].upper()}"
    nested = f"{ENV_PREFIX}{loc[0]}__{loc[1]}".upper()
    flat = next((f"{ENV_PREFIX}{name}".upper() for name, target in LEGACY_NAMES.items()
                 if target == (loc[0], loc[1])), nested)
    return nested if nested in env else flat


def _group_variables(group: str, env: Mapping[str, str]) -> str:
    """The variables set for `group`, for a problem between several of its settings."""
    names = sorted({_variable_name((group, field), env)
                    for field in GROUPS[group].model_fields})
    set_names = [name for name in names if name in env]
    return ", ".join(set_names or names)


def _expected_form(loc: tuple[str, ...], error_type: str, message: str) -> str:
    field = _field_info(loc)
    if (field is not None and len(loc) == 2 and message.startswith("Input should be ")
            and getattr(field.annotation, "__origin__", None) is list):
        example = json.dumps(field.examples[0]) if field.examples else "[]"
        return f"expected a JSON list such as '{example}'"
    if not message.startswith("Input should be "):
        return message
    form = message.removeprefix("Input should be ")
    if error_type in _BOUND_ERRORS:
        form = f"a number {form}"
    return f"expected {form}"


def _field_info(loc: tuple[str, ...]) -> FieldInfo | None:
    if loc[0] in GROUPS and len(loc) >= 2:
        return GROUPS[loc[0]].model_fields.get(loc[1])
    return Settings.model_fields.get(loc[0])


def _echo(variable: str, loc: tuple[str, ...], error: Any, env: Mapping[str, str]) -> str:
    if any(word in part for part in loc for word in _UNECHOED):
        return ""
    value = env.get(variable, error.get("input"))
    if not isinstance(value, str | int | float):
        return ""
    shown = str(value)
    if len(shown) > _LONGEST_ECHO:
        shown = shown[:_LONGEST_ECHO] + "…"
    return f", got {shown!r}"
