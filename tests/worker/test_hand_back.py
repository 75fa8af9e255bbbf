"""A worker that shuts down hands its running job back: QUEUED, lease released, the attempt
given back, a line in the job's log; a job whose cancel was asked ends CANCELLED instead; a
wake-up delivered to a stopping worker goes back to the broker unclaimed.

In one process, against the embedded database, with the real heartbeat and training; the
same through Celery's signal handling, in real worker processes: tests/chaos/
test_worker_stopped.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import Reject
from sqlalchemy import select, update

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobEvent, JobLog, JobStatus
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from worker import shutdown
from worker.assets.build_dataset import DATASET_PATH
from worker.tasks import run_claimed_job, train

MAX_ATTEMPTS = 3


@pytest.fixture
def stopping_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process is shutting down, as after Celery's SIGTERM; not after the test."""
    monkeypatch.setattr(shutdown, "_shutting_down", False)
    shutdown.begin_shutdown()
    yield


@pytest.fixture
def queued_job(tunery_env: Path, tiny_model_dir: Path, make_request: Any,
               monkeypatch: pytest.MonkeyPatch) -> tuple[str, FinetuneRequest]:
    monkeypatch.setenv(
        "TUNERY_ALLOWED_LOCAL_DIRS", f'["{DATASET_PATH.parent}", "{tiny_model_dir.parent}"]'
    )
    monkeypatch.setenv("TUNERY_HEARTBEAT_SECONDS", "0.2")
    get_settings.cache_clear()
    upgrade_database(get_settings().database.url)
    request = make_request(training={"num_train_epochs": 20})
    with session_scope() as session:
        tenant = create_api_key(session, "hand-back").tenant_id
        job_id = jobs.create_job(session, tenant, request, max_attempts=MAX_ATTEMPTS,
                                 device_class="train").id
    return job_id, request


def claim(job_id: str) -> Claim:
    with session_scope() as session:
        claimed = jobs.claim_job(session, job_id, "w", get_settings().leases.lease_seconds)
    assert claimed is not None
    return claimed


def test_a_stopping_worker_hands_its_running_job_back(
    queued_job: tuple[str, FinetuneRequest], stopping_worker: None
) -> None:
    job_id, request = queued_job

    handed_back = run_claimed_job(claim(job_id), request)

    assert handed_back
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.QUEUED.value
        assert job.lease_owner is None and job.lease_expires_at is None
        assert job.error is None
        # The attempt it used is given back: a shutdown is not one of the job's failures.
        assert job.attempt == 1 and job.max_attempts == MAX_ATTEMPTS + 1
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                .order_by(JobEvent.id.desc())).first()
        assert event is not None and event.to_status == "QUEUED"
        assert event.reason == "worker w stopping: handed back"
        lines = session.scalars(select(JobLog.line).where(JobLog.job_id == job_id)).all()
    assert any(line.startswith("worker stopping: job handed back") for line in lines), lines
    assert not any(line.startswith("failed") for line in lines), lines
    # Claimable again, by the next worker.
    assert claim(job_id).attempt == 2


def test_a_stopping_worker_ends_a_job_whose_cancel_was_asked_cancelled(
    queued_job: tuple[str, FinetuneRequest], stopping_worker: None
) -> None:
    job_id, request = queued_job
    claimed = claim(job_id)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))

    handed_back = run_claimed_job(claimed, request)

    assert not handed_back
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.CANCELLED.value
        assert job.error == "cancelled by the user"


def test_a_wake_up_reaching_a_stopping_worker_goes_back_to_the_broker_unclaimed(
    queued_job: tuple[str, FinetuneRequest], stopping_worker: None
) -> None:
    job_id, _ = queued_job

    with pytest.raises(Reject) as rejected:
        train(job_id)

    assert rejected.value.requeue
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.QUEUED.value and job.attempt == 0


def test_an_attempt_its_worker_cannot_prepare_moves_on_at_once_and_stops_its_heartbeat(
    queued_job: tuple[str, FinetuneRequest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A work dir that cannot be made (a full disk, a file in its way) is the worker's fault:
    the job is re-queued as from a lost attempt, not left RUNNING under a heartbeat that
    renews its lease for ever."""
    job_id, request = queued_job
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("x")
    monkeypatch.setenv("TUNERY_WORK_DIR", str(in_the_way / "work"))
    get_settings.cache_clear()

    handed_back = run_claimed_job(claim(job_id), request)

    assert not handed_back
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.QUEUED.value
        assert job.lease_owner is None and job.lease_expires_at is None
        # Counted: a worker that keeps failing fails the job after its attempts.
        assert job.attempt == 1 and job.max_attempts == MAX_ATTEMPTS
        requeue = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                  .order_by(JobEvent.id.desc())).first()
        assert requeue is not None and requeue.to_status == JobStatus.QUEUED.value
        assert "could not prepare the attempt: NotADirectoryError" in (requeue.reason or "")
        lines = session.scalars(select(JobLog.line).where(JobLog.job_id == job_id)).all()
        assert any("could not prepare the attempt" in line for line in lines), lines
