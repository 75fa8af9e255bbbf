"""A Tunery job as OpenAI's `fine_tuning.job` object, whichever dialect created it."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from api.openai import ids
from api.openai.job_request import BASE_LEARNING_RATE
from api.openai.schemas import FineTuningJob, Hyperparameters, JobError
from shared.models import Job, JobStatus
from shared.training_plan import DEFAULT_BETA, job_seed, micro_batch_size

STATUSES = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "running",
    JobStatus.COMPLETED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.PAUSED: "paused",
}
# A job that failed for a reason the service gave no code for (its data, its model, a crash).
FAILED_CODE = "fine_tuning_failed"
_NAME_SEGMENT = re.compile(r"[^A-Za-z0-9._-]+")


def openai_status(job: Job) -> str:
    return STATUSES[JobStatus(job.status)]


def fine_tuned_model(job: Job, organization: str) -> str:
    """`ft:{base}:{org}:{suffix}:{short id}`, OpenAI's naming; an empty suffix leaves its
    segment empty. The short id is the job id's first 8 hex digits."""
    fields = job.openai or {}
    suffix = fields.get("suffix") or ""
    return f"ft:{_model_asked(job)}:{name_segment(organization)}:{suffix}:{job.id[:8]}"


def checkpoint_model(job: Job, organization: str, step: int) -> str:
    return f"{fine_tuned_model(job, organization)}:ckpt-step-{step}"


def name_segment(name: str) -> str:
    """A tenant name as a segment of a model name: no ':' (the separator) nor spaces."""
    return _NAME_SEGMENT.sub("-", name).strip("-").lower() or "org"


def epoch(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def hyperparameters(job: Job) -> tuple[str, dict[str, Any]]:
    """(method type, hyperparameters) as OpenAI reports them: as asked ("auto" kept) until the
    job starts, the numbers it trains with from then on. A job created through the MonsterAPI
    dialect reports its payload's numbers."""
    fields = job.openai
    training = job.payload.get("training_config", {})
    if fields is not None:
        started = job.started_at is not None or job.status != JobStatus.QUEUED.value
        shown = fields["resolved"] if started else fields["asked"]
        return fields["method"], dict(shown)
    method = "dpo" if training.get("preference_optimization") == "DPO" else "supervised"
    micro = micro_batch_size(training.get("micro_batch_size"))
    epochs = training.get("num_train_epochs", 1)
    shown = {
        # Whole epochs as OpenAI counts them; a MonsterAPI job may also train a fraction.
        "n_epochs": int(epochs) if float(epochs).is_integer() else epochs,
        "batch_size": micro * training.get("gradient_accumulation_steps", 1),
        "learning_rate_multiplier": training.get("learning_rate", 0.001) / BASE_LEARNING_RATE,
    }
    if method == "dpo":
        shown["beta"] = training.get("beta") or DEFAULT_BETA
    return method, shown


def job_object(job: Job, organization: str, *, eta_s: float | None = None,
               eta_at: datetime | None = None) -> FineTuningJob:
    """`eta_s`, measured at `eta_at`, is the worker's last estimate of the time left."""
    fields = job.openai or {}
    training = job.payload.get("training_config", {})
    data_path = job.payload.get("data_config", {}).get("data_path", "")
    status = openai_status(job)
    method, shown = hyperparameters(job)
    completed = job.status == JobStatus.COMPLETED.value
    result = job.result or {}
    error = None
    if job.status == JobStatus.FAILED.value:
        error = JobError(code=job.error_code or FAILED_CODE, message=job.error or "failed",
                         param=fields.get("error_param"))
    estimated = None
    if job.status == JobStatus.RUNNING.value and eta_s is not None and eta_at is not None:
        estimated = epoch(eta_at + timedelta(seconds=eta_s))
    return FineTuningJob(
        id=ids.openai_job_id(job.id),
        created_at=epoch(job.created_at) or 0,
        model=_model_asked(job),
        organization_id=job.tenant_id,
        status=status,  # type: ignore[arg-type]
        training_file=fields.get("training_file") or (
            ids.file_id(data_path) if data_path.startswith("ds_") else data_path),
        validation_file=fields.get("validation_file"),
        seed=job_seed(training.get("seed")),
        fine_tuned_model=fine_tuned_model(job, organization) if completed else None,
        finished_at=epoch(job.finished_at),
        trained_tokens=result.get("trained_tokens") if completed else None,
        estimated_finish=estimated,
        result_files=[ids.result_file_id(job.id)] if completed else [],
        error=error,
        hyperparameters=Hyperparameters(**shown),
        method={"type": method, method: {"hyperparameters": shown}},
        integrations=fields.get("integrations") or _wandb_of_payload(job.payload),
        metadata=fields.get("metadata"),
        user_provided_suffix=fields.get("suffix"),
        tunery_job_id=job.id,
        tunery_device_class=job.device_class,
    )


def _model_asked(job: Job) -> str:
    return (job.openai or {}).get("model") or job.base_model


def _wandb_of_payload(payload: dict[str, Any]) -> list[dict[str, Any]] | None:
    logging = payload.get("logging_config", {})
    if not logging.get("use_wandb"):
        return None
    return [{"type": "wandb", "wandb": {
        "project": logging.get("wandb_project"), "entity": logging.get("wandb_username") or None,
        "name": logging.get("wandb_run_name") or None, "tags": None}}]
