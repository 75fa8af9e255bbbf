"""`pretrainedmodel_config.resume_checkpoint_path`: continue from an earlier Tunery job.

The value names one of the caller's own earlier jobs, never a URL or a file: Tunery reads
checkpoints only from its own storage, so nothing a client uploads is ever unpickled.

    {job_id}                           the job's final adapter if it completed, else its
                                       latest complete checkpoint
    jobs/{job_id}                      the job's final adapter (the job must have completed)
    jobs/{job_id}/checkpoints/step-N   the checkpoint written at optimizer step N

These references are public API, not storage keys: where the adapter or checkpoint is stored
is `shared.storage_keys`' business, and the worker looks it up there.

The schema checks the grammar (`parse_resume_path`); the API checks at submit that the job
exists, belongs to the caller and has what the path names (`resume_problems`: a completed job
its final adapter, any other job a complete checkpoint in storage); the worker then reads the
adapter weights from storage. Standard library and SQLAlchemy only: the API has no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.models import Job, JobStatus
from shared.served_models import trained_whole_model
from shared.storage_keys import CHECKPOINT_MARKER, job_checkpoint_prefixes, parse_checkpoint_key

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shared.storage import Storage

FIELD = "pretrainedmodel_config.resume_checkpoint_path"

# The same alphabet as the API's job id path parameter.
_JOB_ID = r"[A-Za-z0-9][A-Za-z0-9-]{0,63}"
_RESUME_PATH = re.compile(
    rf"(?P<bare>{_JOB_ID})|jobs/(?P<job>{_JOB_ID})(?:/checkpoints/step-(?P<step>[1-9][0-9]{{0,9}}))?"
)

# An adapter only continues the earlier model if its shape and scaling are the same.
_MUST_MATCH = ("lora_r", "lora_alpha")


@dataclass(frozen=True)
class ResumeSource:
    """A parsed resume_checkpoint_path."""

    job_id: str
    step: int | None = None
    """A checkpoint's optimizer step; None for the final adapter (or, when `latest`, either)."""
    latest: bool = False
    """A bare job id: the final adapter if there is one, else the latest complete checkpoint."""


def parse_resume_path(value: str) -> ResumeSource:
    """Parse a resume_checkpoint_path, or raise ValueError saying what is accepted."""
    match = _RESUME_PATH.fullmatch(value.removesuffix("/"))
    if match is None:
        raise ValueError(
            "name an earlier job of yours: '{job_id}', 'jobs/{job_id}' (its final adapter) or "
            "'jobs/{job_id}/checkpoints/step-N'; URLs and file paths are not accepted"
        )
    if match["bare"]:
        return ResumeSource(match["bare"], latest=True)
    step = int(match["step"]) if match["step"] else None
    return ResumeSource(match["job"], step=step)


def checkpoint_steps(storage: Storage, job_id: str) -> list[int]:
    """The steps of the job's checkpoints whose upload finished (their marker is stored),
    under either storage layout, in order. The worker reads each marker again before it
    resumes from one."""
    steps = set()
    for prefix in job_checkpoint_prefixes(job_id):
        for obj in storage.list(prefix):
            parsed = parse_checkpoint_key(prefix, obj.key)
            if parsed is not None and parsed[1] == CHECKPOINT_MARKER:
                steps.add(parsed[0])
    return sorted(steps)


def resume_problems(
    session: Session, storage: Storage, tenant_id: str, config: Any
) -> list[dict[str, str]]:
    """Why the caller cannot continue from `config.resume_checkpoint_path`, as error fields.

    `config` is the request's `PretrainedModelConfig`. Empty when the path is empty or fine.
    Another tenant's job reads as missing, as everywhere in the API.
    """
    value = config.resume_checkpoint_path
    if not value:
        return []
    try:
        source = parse_resume_path(value)
    except ValueError as exc:
        return [{"path": FIELD, "message": str(exc)}]
    job = session.get(Job, source.job_id)
    if job is None or job.tenant_id != tenant_id:
        return [{"path": FIELD, "message": f"no job with id {source.job_id}"}]
    if trained_whole_model(job.payload):
        return [{"path": FIELD, "message": f"job {job.id} trained the whole model (use_lora "
                 "false): it has no LoRA adapter to continue from"}]
    completed = job.status == JobStatus.COMPLETED.value
    message = None
    if source.step is None and not source.latest and not completed:
        message = f"job {job.id} is {job.status}, so it has no final adapter"
        if checkpoint_steps(storage, job.id):
            message += (f"; name one of its checkpoints ('jobs/{job.id}/checkpoints/step-N') "
                        "or just its id for the latest")
        else:
            message += " and no checkpoint to continue from"
    elif source.step is not None and completed:
        # The worker deletes a job's checkpoints once its final adapter is uploaded.
        message = f"job {job.id} completed: continue from its final adapter; use 'jobs/{job.id}'"
    elif not completed and (missing := _missing_checkpoint(storage, job, source.step)):
        message = missing
    elif job.base_model != config.model_path:
        message = (
            f"job {job.id} trained an adapter for {job.base_model!r}, but model_path is "
            f"{config.model_path!r}; an adapter continues only on its own base model"
        )
    else:
        earlier = job.payload.get("pretrainedmodel_config", {})
        for name in _MUST_MATCH:
            if name in earlier and earlier[name] != getattr(config, name):
                message = (
                    f"job {job.id} used {name}={earlier[name]}, this request {name}="
                    f"{getattr(config, name)}; set the same value to continue its adapter"
                )
                break
    return [{"path": FIELD, "message": message}] if message else []


def _missing_checkpoint(storage: Storage, job: Job, step: int | None) -> str | None:
    """Why the unfinished `job` has no checkpoint to continue from (at `step`, or any when
    None); None when it has one."""
    steps = checkpoint_steps(storage, job.id)
    if step is not None and step in steps:
        return None
    if step is None and steps:
        return None
    if not steps:
        wait = ("; wait for its first checkpoint" if job.status in (
            JobStatus.QUEUED.value, JobStatus.RUNNING.value) else "")
        return f"job {job.id} is {job.status} and has no checkpoint to continue from{wait}"
    return (
        f"job {job.id} has no checkpoint at step {step}; its checkpoints are at steps "
        f"{steps} ('jobs/{job.id}/checkpoints/step-N', or just its id for the latest)"
    )
