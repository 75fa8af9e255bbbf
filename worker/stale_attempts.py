"""Work directories left by attempts that ended without cleaning up after themselves.

An attempt removes its directory when it ends (`worker.attempt`), but not one whose worker
was killed (`kill -9`, the out-of-memory killer, a lost host): its downloads, checkpoints
and, for a job on several devices, the spec its ranks read, secrets included, would stay on
disk for good. A starting worker removes every attempt directory whose attempt is not
running: the job's row says so, so workers sharing the directory keep each other's."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from shared.db import session_scope
from shared.models import Job, JobStatus

log = logging.getLogger("tunery.worker")

# `<job id>-<attempt>` (`worker.attempt`) and `export-<export id>-<attempt>` (`export_run`).
_ATTEMPT_DIR = re.compile(r"(?P<job>[0-9a-f-]{36})-(?P<attempt>\d+)")


def remove_stale_attempt_dirs(work_dir: Path) -> list[str]:
    """Remove the directories under `work_dir` of job attempts that are not RUNNING; returns
    their names. Export directories are left to their exports' own cleanup. With the
    database unreachable, nothing is removed (the next start tries again): a worker must not
    fail to start over leftovers."""
    candidates = {}
    for entry in work_dir.iterdir() if work_dir.is_dir() else ():
        matched = _ATTEMPT_DIR.fullmatch(entry.name)
        if matched and entry.is_dir():
            candidates[entry] = (matched["job"], int(matched["attempt"]))
    if not candidates:
        return []
    job_ids = {job_id for job_id, _ in candidates.values()}
    try:
        with session_scope() as session:
            running = set(session.execute(
                select(Job.id, Job.attempt)
                .where(Job.id.in_(job_ids), Job.status == JobStatus.RUNNING.value)
            ).tuples())
    except SQLAlchemyError as exc:
        log.warning("could not tell which work directories are stale (%s); kept them", exc)
        return []
    removed = []
    for path, attempt in candidates.items():
        if attempt not in running:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        log.info("removed %d work directories of attempts no longer running: %s",
                 len(removed), ", ".join(sorted(removed)))
    return removed
