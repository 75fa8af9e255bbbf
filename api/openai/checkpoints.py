"""A job's checkpoints as OpenAI lists them (`fine_tuning.job.checkpoint`): the complete ones
in storage, newest first, each with the metrics logged at its step and its adapter to
download. A running job's list grows and is pruned to the last few
(`TUNERY_CHECKPOINTS_TO_KEEP`); a completed job keeps those checkpoints' adapters."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.openai import ids
from api.openai.job_view import checkpoint_model, epoch
from api.openai.schemas import Checkpoint, CheckpointMetrics
from shared.artifacts import Artifact
from shared.models import Job, JobMetric
from shared.resume import checkpoint_steps
from shared.storage import Storage
from shared.storage_keys import (
    ADAPTER_FILES,
    CHECKPOINT_MARKER,
    INITIAL_ADAPTER_FILE,
    checkpoint_step_prefix,
    job_checkpoint_prefixes,
    parse_checkpoint_key,
)


def list_checkpoints(session: Session, storage: Storage, job: Job,
                     organization: str) -> list[Checkpoint]:
    steps = sorted(checkpoint_steps(storage, job.id), reverse=True)
    if not steps:
        return []
    metrics: dict[int, dict[str, float]] = {}
    rows = session.execute(select(JobMetric.step, JobMetric.values, JobMetric.at)
                           .where(JobMetric.job_id == job.id, JobMetric.step.in_(steps))
                           .order_by(JobMetric.id)).all()
    logged_at = {}
    for step, values, at in rows:
        metrics.setdefault(step, {}).update(values)
        logged_at[step] = at
    listed = []
    for step in steps:
        values = metrics.get(step, {})
        checkpoint_id = ids.checkpoint_id(job.id, step)
        listed.append(Checkpoint(
            id=checkpoint_id,
            created_at=epoch(logged_at.get(step) or job.updated_at) or 0,
            fine_tuned_model_checkpoint=checkpoint_model(job, organization, step),
            fine_tuning_job_id=ids.openai_job_id(job.id),
            step_number=step,
            metrics=CheckpointMetrics(
                step=float(step), train_loss=values.get("loss"),
                train_mean_token_accuracy=values.get("mean_token_accuracy"),
                valid_loss=values.get("eval_loss"),
                valid_mean_token_accuracy=values.get("eval_mean_token_accuracy"),
            ),
            download_url=(f"/v1/fine_tuning/jobs/{ids.openai_job_id(job.id)}/checkpoints/"
                          f"{checkpoint_id}/archive"),
        ))
    return listed


def adapter_files(storage: Storage, job_id: str, step: int) -> list[Artifact]:
    """The adapter files of the job's complete checkpoint at `step` (its marker stored);
    empty when there is none. One listing of the step's folder per layout. A PiSSA/OLoRA
    checkpoint's initial adapter comes along: its adapter is relative to the base minus the
    initial one, and peft's conversion for the original base needs both."""
    for prefix in job_checkpoint_prefixes(job_id):
        found, complete = [], False
        for obj in storage.list(checkpoint_step_prefix(prefix, step)):
            parsed = parse_checkpoint_key(prefix, obj.key)
            if parsed is None or parsed[0] != step:
                continue
            complete = complete or parsed[1] == CHECKPOINT_MARKER
            if parsed[1] in (*ADAPTER_FILES, INITIAL_ADAPTER_FILE):
                found.append(Artifact(parsed[1], obj.key, obj.size))
        if complete and sum(a.name in ADAPTER_FILES for a in found) == len(ADAPTER_FILES):
            return sorted(found, key=lambda a: a.name)
    return []
    for prefix in job_checkpoint_prefixes(job_id):
        found = []
        for obj in storage.list(checkpoint_step_prefix(prefix, step)):
            parsed = parse_checkpoint_key(prefix, obj.key)
            if parsed is not None and parsed[1] in ADAPTER_FILES:
                found.append(Artifact(parsed[1], obj.key, obj.size))
        if len(found) == len(ADAPTER_FILES):
            return sorted(found, key=lambda a: a.name)
    return []
