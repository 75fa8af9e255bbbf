"""Retention: the stored files of finished jobs removed once the days the operator set have
passed (`settings.retention`; off unless set). Run by the maintenance sweep.

Only files go, never rows: the job, its logs and metrics stay listed, and a log line tells
its owner what was removed and why. Each job's removal is marked on its row
(`Job.checkpoints_removed_at`, `Job.artifacts_removed_at`), so a sweep picks only jobs not
done yet, oldest finished first, at most `batch` of each kind: a backlog (retention turned
on over years of jobs) drains over several sweeps instead of stalling one. Objects go before
the mark: a sweep that dies in between removes them again next time, which is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from shared import jobs, storage_keys
from shared.db import session_scope
from shared.models import TERMINAL_STATUSES, Deployment, DeploymentStatus, Job, utcnow
from shared.settings import RetentionSettings
from shared.storage import Storage

log = logging.getLogger("tunery.retention")


@dataclass
class RetentionResult:
    checkpoints_removed: list[str] = field(default_factory=list)
    """Jobs whose checkpoints this run removed."""
    artifacts_removed: list[str] = field(default_factory=list)
    """Jobs whose artifacts (adapter, tokenizer, exports) this run removed."""


@dataclass(frozen=True)
class _Kind:
    what: str
    setting: str
    mark: InstrumentedAttribute[Any]
    prefixes: Callable[[str], tuple[str, ...]]
    keep_live_deployments: bool


_CHECKPOINTS = _Kind("checkpoints", "TUNERY_RETENTION_DAYS", Job.checkpoints_removed_at,
                     storage_keys.job_checkpoint_prefixes, keep_live_deployments=False)
# A live deployment loads the adapter from storage on its next request: its job keeps it.
_ARTIFACTS = _Kind("artifacts", "TUNERY_ARTIFACT_RETENTION_DAYS", Job.artifacts_removed_at,
                   lambda job_id: (storage_keys.job_artifact_prefix(job_id),),
                   keep_live_deployments=True)


def apply_retention(settings: RetentionSettings, storage: Storage,
                    now: datetime | None = None) -> RetentionResult:
    """Remove what `settings` says has been kept long enough, as of `now`; a no-op when no
    retention is set."""
    now = now or utcnow()
    result = RetentionResult()
    for kind, days, removed in (
        (_CHECKPOINTS, settings.checkpoint_days, result.checkpoints_removed),
        (_ARTIFACTS, settings.artifact_days, result.artifacts_removed),
    ):
        if days is None:
            continue
        with session_scope() as session:
            due = _due(session, kind, now - timedelta(days=days), settings.batch)
        for job_id in due:
            for prefix in kind.prefixes(job_id):
                storage.delete_prefix(prefix)
            with session_scope() as session:
                if _mark(session, kind, job_id, days, now):
                    removed.append(job_id)
        if removed:
            log.info("retention: removed the %s of %d job(s) finished more than %d days ago "
                     "(%s): %s", kind.what, len(removed), days, kind.setting, ", ".join(removed))
    return result


def _due(session: Session, kind: _Kind, finished_before: datetime, limit: int) -> list[str]:
    where = [Job.status.in_([status.value for status in TERMINAL_STATUSES]),
             Job.finished_at < finished_before, kind.mark.is_(None)]
    if kind.keep_live_deployments:
        where.append(~exists().where(Deployment.job_id == Job.id,
                                     Deployment.status == DeploymentStatus.LIVE.value))
    return list(session.scalars(
        select(Job.id).where(*where).order_by(Job.finished_at, Job.id).limit(limit)
    ))


def _mark(session: Session, kind: _Kind, job_id: str, days: int, now: datetime) -> bool:
    """Record the removal on the job, and tell its owner in its log; False when the job was
    deleted meanwhile or another sweep marked it first."""
    attempt = session.scalar(
        update(Job).where(Job.id == job_id, kind.mark.is_(None))
        .values({kind.mark: now}).returning(Job.attempt)
    )
    if attempt is None:
        return False
    jobs.append_log(session, job_id, attempt,
                    f"retention: {kind.what} removed, {days} days after the job finished "
                    f"({kind.setting})")
    return True
