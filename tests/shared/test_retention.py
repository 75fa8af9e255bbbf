"""Retention (`shared.retention`, run by the maintenance sweep): finished jobs' checkpoints,
and with its own setting their artifacts, removed after N days; nothing else, each job once,
at most a batch per sweep."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import update

from shared import jobs
from shared.db import session_scope
from shared.maintenance import sweep
from shared.migrate import upgrade_database
from shared.models import Deployment, Job, JobLog, JobStatus, utcnow
from shared.retention import apply_retention
from shared.schema import FinetuneRequest
from shared.settings import RetentionSettings, Settings, get_settings
from shared.storage import Storage, storage_from_settings
from shared.storage_keys import job_checkpoint_prefixes, job_prefixes
from shared.tenancy import ALL_TENANTS
from tests.conftest import make_payload

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=utcnow().tzinfo)


def job_finished(storage: Storage, status: JobStatus, days_ago: float | None) -> str:
    """A job in `status` with a checkpoint in both layouts and an adapter in storage; a
    finished one ended `days_ago` days before NOW."""
    with session_scope() as session:
        from shared.keys import create_api_key

        tenant_id = create_api_key(session, f"t-{utcnow().timestamp()}").tenant_id
        job_id = jobs.create_job(session, tenant_id, FinetuneRequest.model_validate(
            make_payload()), 3, device_class="train").id
    for key in (f"checkpoints/{job_id}/step-5/adapter_model.safetensors",
                f"jobs/{job_id}/checkpoints/step-2/adapter_model.safetensors",
                f"jobs/{job_id}/adapter_model.safetensors",
                f"jobs/{job_id}/exports/merged/model.safetensors"):
        storage.put_bytes(key, b"x")
    with session_scope() as session:
        if status is not JobStatus.QUEUED:
            claim = jobs.claim_job(session, job_id, "w", 60)
            assert claim is not None
            if status is not JobStatus.RUNNING:
                assert jobs.transition(session, job_id, status, attempt=claim.attempt)
        if days_ago is not None:
            session.execute(update(Job).where(Job.id == job_id)
                            .values(finished_at=NOW - timedelta(days=days_ago)))
    return job_id


def kept(storage: Storage, job_id: str) -> dict[str, int]:
    checkpoints = sum(len(storage.list(p)) for p in job_checkpoint_prefixes(job_id))
    everything = sum(len(storage.list(p)) for p in job_prefixes(job_id))
    return {"checkpoints": checkpoints, "artifacts": everything - checkpoints}


def setup(tunery_env: Path) -> Storage:
    upgrade_database(get_settings().database.url)
    return storage_from_settings(get_settings())


def test_checkpoints_of_jobs_finished_past_the_days_go_and_nothing_else(
        tunery_env: Path) -> None:
    storage = setup(tunery_env)
    old = {status: job_finished(storage, status, days_ago=31)
           for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)}
    recent = job_finished(storage, JobStatus.FAILED, days_ago=29)
    running = job_finished(storage, JobStatus.RUNNING, days_ago=None)
    queued = job_finished(storage, JobStatus.QUEUED, days_ago=None)

    result = apply_retention(RetentionSettings(checkpoint_days=30), storage, now=NOW)

    assert sorted(result.checkpoints_removed) == sorted(old.values())
    assert result.artifacts_removed == []
    for job_id in old.values():
        assert kept(storage, job_id) == {"checkpoints": 0, "artifacts": 2}
    for job_id in (recent, running, queued):
        assert kept(storage, job_id) == {"checkpoints": 2, "artifacts": 2}
    with session_scope() as session:
        line = session.query(JobLog.line).filter(JobLog.job_id == old[JobStatus.FAILED]).all()
        assert [row.line for row in line if row.line.startswith("retention:")] == [
            "retention: checkpoints removed, 30 days after the job finished "
            "(TUNERY_RETENTION_DAYS)"]
    # Idempotent: a second run finds nothing more to do, and logs nothing more.
    again = apply_retention(RetentionSettings(checkpoint_days=30), storage, now=NOW)
    assert again.checkpoints_removed == []
    with session_scope() as session:
        assert session.query(JobLog).filter(JobLog.line.startswith("retention:")).count() == 3


def test_artifacts_go_with_their_own_setting_except_a_live_deployments(tunery_env: Path) -> None:
    storage = setup(tunery_env)
    plain = job_finished(storage, JobStatus.COMPLETED, days_ago=91)
    deployed = job_finished(storage, JobStatus.COMPLETED, days_ago=91)
    with session_scope() as session:
        job = jobs.get_job(session, ALL_TENANTS, deployed)
        session.add(Deployment(id="dep-x", tenant_id=job.tenant_id, job_id=deployed, name="x",
                               base_model=job.base_model, prompt_template="{prompt}",
                               payload={}))

    result = apply_retention(RetentionSettings(artifact_days=90), storage, now=NOW)

    assert result.artifacts_removed == [plain]
    assert result.checkpoints_removed == []
    # The legacy checkpoint folder lies inside the artifacts' and goes with them; the current
    # one is kept until TUNERY_RETENTION_DAYS says otherwise.
    assert kept(storage, plain) == {"checkpoints": 1, "artifacts": 0}
    assert kept(storage, deployed) == {"checkpoints": 2, "artifacts": 2}


def test_each_run_removes_at_most_a_batch_oldest_first(tunery_env: Path) -> None:
    storage = setup(tunery_env)
    ids = [job_finished(storage, JobStatus.FAILED, days_ago=40 - i) for i in range(3)]
    settings = RetentionSettings(checkpoint_days=30, batch=2)

    first = apply_retention(settings, storage, now=NOW)
    second = apply_retention(settings, storage, now=NOW)

    assert (first.checkpoints_removed, second.checkpoints_removed) == (ids[:2], ids[2:])


def test_the_maintenance_sweep_applies_retention_only_when_set(tunery_env: Path) -> None:
    storage = setup(tunery_env)
    job_id = job_finished(storage, JobStatus.FAILED, days_ago=None)
    with session_scope() as session:  # finished two days before the real now
        session.execute(update(Job).where(Job.id == job_id)
                        .values(finished_at=utcnow() - timedelta(days=2)))

    assert sweep(get_settings()).retention.checkpoints_removed == []
    assert kept(storage, job_id)["checkpoints"] == 2
    settings = Settings(retention_days=1)
    assert sweep(settings).retention.checkpoints_removed == [job_id]
    assert kept(storage, job_id) == {"checkpoints": 0, "artifacts": 2}
