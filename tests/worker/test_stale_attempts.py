"""A starting worker removes the work directories of attempts that are not running (their
worker was killed before it could), and keeps those of running attempts, whoever runs them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared import jobs
from shared.db import reset_engines, session_scope
from shared.models import JobStatus
from shared.settings import get_settings
from tests.shared.test_maintenance import embedded, submit
from tests.worker.test_heartbeat import UNREACHABLE_DB
from worker.stale_attempts import remove_stale_attempt_dirs


def test_directories_of_attempts_not_running_are_removed_the_running_ones_kept(
    tunery_env: Path, tmp_path: Path
) -> None:
    embedded(tunery_env)
    running, finished = submit(2)
    with session_scope() as session:
        assert jobs.claim_job(session, running, "worker-a", 600) is not None
        claim = jobs.claim_job(session, finished, "worker-b", 600)
        assert claim is not None
        jobs.transition(session, finished, JobStatus.COMPLETED, attempt=claim.attempt)
    work = tmp_path / "work"
    kept = [f"{running}-1", f"export-{uuid.uuid4()}-1", "notes"]
    removed = [f"{running}-0", f"{finished}-1", f"{uuid.uuid4()}-1"]
    for name in kept + removed:
        (work / name / "group").mkdir(parents=True)
        (work / name / "group" / "spec.json").write_text("{\"hf_token\": \"secret\"}")

    assert sorted(remove_stale_attempt_dirs(work)) == sorted(removed)
    assert sorted(p.name for p in work.iterdir()) == sorted(kept)
    assert remove_stale_attempt_dirs(work) == []
    assert remove_stale_attempt_dirs(tmp_path / "absent") == []


def test_with_the_database_unreachable_every_directory_is_kept(
    tunery_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    (work / f"{uuid.uuid4()}-1").mkdir(parents=True)
    monkeypatch.setenv("TUNERY_DATABASE_URL", UNREACHABLE_DB)
    get_settings.cache_clear()
    reset_engines()
    try:
        assert remove_stale_attempt_dirs(work) == []
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        reset_engines()
    assert len(list(work.iterdir())) == 1
