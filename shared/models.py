"""Database tables. The schema changes only through Alembic revisions in `migrations/`."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """`moment` with its zone: SQLite hands timestamps back without one, and every time
    Tunery writes is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class JobStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    """Stopped on the user's request with its progress kept; resuming queues it again."""
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class KeyRole(enum.StrEnum):
    MEMBER = "member"
    """Sees and acts on its own tenant's jobs and datasets only."""
    ADMIN = "admin"
    """For operators: sees and acts on every tenant's jobs and datasets."""


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    """The tenant's share of the workers, set by an admin (`shared.tenant_weights`): a free
    worker claims from the tenant whose running jobs divided by its weight is lowest
    (`shared.jobs.claim_next`)."""


class ApiKey(Base):
    """An API key. Only a hash of the secret is stored; the prefix finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(
        String(16), default=KeyRole.MEMBER.value, server_default=KeyRole.MEMBER.value
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        # The active-jobs count of every submit reads only the tenant's own active jobs.
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    phase: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_model: Mapped[str] = mapped_column(String(512))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set on a RUNNING job only: its worker pauses it at the next step (`jobs.request_pause`).
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Sentences about what the service changed in, or doubts about, this job (a capped
    # warm-up, a default prompt template); shown with the job, never a reason to fail it.
    warnings: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the current attempt was claimed: the hard time limit counts from here.
    attempt_started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # A stable, machine-readable reason beside `error` where the service knows one (the
    # OpenAI dialect's `invalid_training_file`, `invalid_n_examples`); None otherwise.
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    # What a job created through the OpenAI dialect was asked beyond the training payload
    # (`shared.openai_job.OpenAIJobFields`): suffix, metadata, file ids, method and its
    # hyperparameters as asked and as resolved. None for jobs created otherwise.
    openai: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Where on the memory ladder (`worker.memory_ladder`) the next attempt trains: 0 as
    # asked; each out-of-memory moves it one rung down, for every later attempt.
    memory_rung: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the retention sweep (`shared.retention`) removed the finished job's checkpoints, and
    # its artifacts: set once, so that each sweep moves on to jobs it has not done yet.
    checkpoints_removed_at: Mapped[datetime | None] = mapped_column(default=None)
    artifacts_removed_at: Mapped[datetime | None] = mapped_column(default=None)
    # The device class the job was routed to at submit (`shared.device_classes`): the queue
    # its wake-ups go to, and the only class whose workers claim it.
    device_class: Mapped[str] = mapped_column(String(40), server_default="train")


class JobEvent(Base):
    """One row per status transition: the job's audit trail."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class JobLog(Base):
    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    line: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class JobMetric(Base):
    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetStatus(enum.StrEnum):
    PENDING = "pending"
    """An upload URL was handed out; the bytes have not arrived or not been checked yet."""
    READY = "ready"
    FAILED = "failed"


class Dataset(Base):
    """A dataset file uploaded to Tunery; the bytes live in storage at `storage_key`.

    Parsed once, when it arrives: the row holds what a preview or a submit check needs (row
    count, columns, a sample of the first rows), so neither reads the file again.
    """

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    format: Mapped[str | None] = mapped_column(String(16), default=None)
    storage_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    rows: Mapped[int | None] = mapped_column(BigInteger, default=None)
    columns: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # The delimiter a CSV was read with (sniffed from its header); None for other formats.
    csv_delimiter: Mapped[str | None] = mapped_column(String(1), default=None)
    sample_rows: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    openai_check: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # The upload flow's PUT carries no API key: an unguessable token, stored hashed, stands in.
    upload_token_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    upload_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # OpenAI's file purpose, for files uploaded through `/v1/files`; None for datasets
    # uploaded through `/v1/datasets`, which are training data ("fine-tune") too.
    purpose: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """The first response to a `POST /v1/finetune/llm`, `POST /v1/datasets` or `POST /v1/files`
    sent with an `Idempotency-Key` header; it answers for its job or its dataset.

    The unique constraint, not application code, is what lets only one of many concurrent
    retries create a job: the others fail to insert their row and replay this one.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("api_key_id", "key", name="uq_idempotency_keys_api_key_id_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                               index=True, default=None)
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True, default=None)
    response_status: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ExportStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class JobExport(Base):
    """One export of a completed job (`shared.exports`); its files are the job's artifacts
    under `exports/{kind}/`. Its state never touches the job's."""

    __tablename__ = "job_exports"
    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_job_exports_job_kind"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # `shared.schema.ExportRequest.kind`: "merged", "gguf-f16", "gguf-q8_0".
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=ExportStatus.QUEUED.value)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # Counted by each claim, so that a stale worker's finish is refused (`finish_export`).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # The artifact names of its files, once COMPLETED.
    files: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class DeploymentStatus(enum.StrEnum):
    """A deployment's state, in MonsterAPI's words (its client and docs write them so)."""

    LIVE = "live"
    """Answers chat requests: the engine loads the adapter from storage on the first one."""
    TERMINATED = "TERMINATED"
    """Terminated by its tenant; it answers no more requests, and stays readable."""


class Deployment(Base):
    """A completed job's adapter bound to an endpoint (`POST /v1/deploy/llm`).

    Nothing runs per deployment: the inference engine serves every job's adapter by name
    (`shared.served_models.adapter_name`), so a deployment is the binding and its defaults.
    """

    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    base_model: Mapped[str] = mapped_column(String(512))
    prompt_template: Mapped[str] = mapped_column(Text)
    # The context length asked for (MonsterAPI's max_model_len); None: the base model's own.
    max_model_len: Mapped[int | None] = mapped_column(Integer, default=None)
    status: Mapped[str] = mapped_column(String(16), default=DeploymentStatus.LIVE.value)
    # The deploy payload as accepted, the fields this server ignores included, the endpoint
    # token left out (`shared.deploy_schema.DeployRequest.stored`).
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    requests_served: Mapped[int] = mapped_column(Integer, default=0)
    last_request_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    terminated_at: Mapped[datetime | None] = mapped_column(default=None)


class DeploymentEvent(Base):
    """One line of a deployment's log: created, live, terminated."""

    __tablename__ = "deployment_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), index=True
    )
    line: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(Base):
    """A tenant's URL that receives signed job events (`shared.webhooks`).

    The signing secrets are stored encrypted (`shared.webhooks.signing_secrets`); during a
    rotation's window the previous one signs too, beside the current one.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    # The event types delivered here (`shared.webhooks.events.EVENT_TYPES`), as asked.
    event_types: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(Text)
    # The current secret's last characters (`whsec_…Ab3x`), shown so that its owner can tell
    # which secret is in use; far from enough to sign with.
    secret_hint: Mapped[str] = mapped_column(String(32))
    previous_secret: Mapped[str | None] = mapped_column(Text, default=None)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set when the endpoint answered 410 Gone: nothing more is sent until it is enabled again.
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)
    disabled_reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    """Waiting for its next attempt (or in one, while a sender holds its lease)."""
    DELIVERED = "delivered"
    """The endpoint answered 2xx."""
    FAILED = "failed"
    """Given up: the retry window passed, the endpoint was disabled, or a test send failed."""


class WebhookDelivery(Base):
    """One event for one endpoint: the outbox row, written in the transaction of the change it
    reports. Its id is the `webhook-id` header of every attempt, so a receiver can tell a
    retry from a new event; the body is stored as sent, byte for byte."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING.value)
    # A test send is tried once, by the API, and never retried.
    is_test: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookAttempt(Base):
    """One try at sending a delivery: when, and what came of it (a status code or an error),
    never the response's body. Written when the try starts, so a sender that dies mid-send
    still leaves its attempt on record."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        Index("ix_webhook_attempts_endpoint_started", "endpoint_id", "started_at"),
        Index("ix_webhook_attempts_delivery", "delivery_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    duration_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
