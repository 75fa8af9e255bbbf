"""Pause and resume in the job state machine: a queued job pauses at once, a running one is
asked and its worker pauses it (`hand_back`), a paused job is never claimed nor re-queued by
the reaper, resume queues it again, cancel ends it at once. On SQLite and PostgreSQL; the
races with a worker's transaction on PostgreSQL: tests/integration/test_job_pause_postgres.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import jobs
from shared.jobs import ALLOWED, Claim, IllegalTransition, JobConflict
from shared.keys import create_api_key
from shared.models import TERMINAL_STATUSES, Job, JobEvent, JobStatus, utcnow
from shared.schema import FinetuneRequest
from tests.conftest import make_payload

MAX_ATTEMPTS = 2


@pytest.fixture
def tenant(session: Session) -> str:
    tenant_id = create_api_key(session, "pauser").tenant_id
    session.commit()
    return tenant_id


def submit(session: Session, tenant: str) -> str:
    request = FinetuneRequest.model_validate(make_payload())
    job_id = jobs.create_job(session, tenant, request, MAX_ATTEMPTS, device_class="train").id
    session.commit()
    return job_id


def claim(session: Session, job_id: str, owner: str = "w") -> Claim:
    claimed = jobs.claim_job(session, job_id, owner, 60)
    session.commit()
    assert claimed is not None
    return claimed


def row(session: Session, job_id: str) -> Job:
    return session.get_one(Job, job_id, populate_existing=True)


def events(session: Session, job_id: str) -> list[tuple[str | None, str, str | None]]:
    rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                           .order_by(JobEvent.id)).all()
    return [(e.from_status, e.to_status, e.reason) for e in rows]


def test_the_transition_table_lets_a_job_pause_from_queued_or_running_and_leave_by_resume_or_cancel(
) -> None:
    assert JobStatus.PAUSED not in TERMINAL_STATUSES
    assert ALLOWED[JobStatus.PAUSED] == {JobStatus.QUEUED, JobStatus.CANCELLED}
    into_paused = {source for source, targets in ALLOWED.items() if JobStatus.PAUSED in targets}
    assert into_paused == {JobStatus.QUEUED, JobStatus.RUNNING}


@pytest.mark.parametrize("to", [JobStatus.RUNNING, JobStatus.COMPLETED, JobStatus.FAILED])
def test_a_paused_job_can_only_be_resumed_or_cancelled(
    session: Session, tenant: str, to: JobStatus
) -> None:
    job_id = submit(session, tenant)
    jobs.request_pause(session, tenant, job_id)
    session.commit()

    with pytest.raises(IllegalTransition, match=f"PAUSED -> {to}"):
        jobs.transition(session, job_id, to)


def test_a_queued_job_pauses_at_once_and_nobody_claims_it(session: Session, tenant: str) -> None:
    job_id = submit(session, tenant)

    job = jobs.request_pause(session, tenant, job_id)
    session.commit()

    assert job.status == JobStatus.PAUSED.value and not job.pause_requested
    assert events(session, job_id)[-1] == ("QUEUED", "PAUSED", "paused before it started")
    assert jobs.claim_job(session, job_id, "w", 60) is None
    assert jobs.claim_next(session, "w", 60, device_class="train") is None
    assert jobs.queued_job_ids(session, 10) == [] and jobs.count_queued(session) == 0
    # Pausing it again changes nothing.
    assert jobs.request_pause(session, tenant, job_id).status == JobStatus.PAUSED.value
    assert len(events(session, job_id)) == 2


def test_a_resumed_job_is_queued_and_claimed_again(session: Session, tenant: str) -> None:
    job_id = submit(session, tenant)
    jobs.request_pause(session, tenant, job_id)
    session.commit()

    job = jobs.resume_job(session, tenant, job_id)
    session.commit()

    assert job.status == JobStatus.QUEUED.value
    assert events(session, job_id)[-1] == ("PAUSED", "QUEUED", "resumed by the user")
    # It used no attempt while paused: the first claim is attempt 1.
    assert claim(session, job_id).attempt == 1


def test_a_running_job_is_asked_and_its_worker_pauses_it_giving_the_attempt_back(
    session: Session, tenant: str
) -> None:
    job_id = submit(session, tenant)
    attempt = claim(session, job_id)

    job = jobs.request_pause(session, tenant, job_id)
    session.commit()
    assert job.status == JobStatus.RUNNING.value and job.pause_requested
    assert jobs.renew_lease(session, attempt, 60) == jobs.LeaseRenewal(
        held=True, pause_requested=True
    )

    moved = jobs.hand_back(session, attempt, reason="unused: the pause decides")
    session.commit()

    job = row(session, job_id)
    assert moved is JobStatus.PAUSED and job.status == JobStatus.PAUSED.value
    assert not job.pause_requested and job.phase is None
    assert job.lease_owner is None and job.lease_expires_at is None
    assert (job.attempt, job.max_attempts) == (1, MAX_ATTEMPTS + 1)
    assert events(session, job_id)[-1] == ("RUNNING", "PAUSED", "paused by the user")
    # The paused attempt's late writes are stale.
    assert not jobs.renew_lease(session, attempt, 60).held
    assert not jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=attempt.attempt)

    jobs.resume_job(session, tenant, job_id)
    session.commit()
    assert claim(session, job_id).attempt == 2


def test_a_resume_before_the_worker_pauses_withdraws_the_pause(
    session: Session, tenant: str
) -> None:
    job_id = submit(session, tenant)
    attempt = claim(session, job_id)
    jobs.request_pause(session, tenant, job_id)
    session.commit()

    job = jobs.resume_job(session, tenant, job_id)
    session.commit()

    assert job.status == JobStatus.RUNNING.value and not job.pause_requested
    assert not jobs.renew_lease(session, attempt, 60).pause_requested
    # A worker that saw the pause before it was withdrawn hands the job back to the queue.
    assert jobs.hand_back(session, attempt, reason="resumed while pausing") is JobStatus.QUEUED
    session.commit()
    assert events(session, job_id)[-1] == ("RUNNING", "QUEUED", "resumed while pausing")


def test_resuming_a_queued_or_running_job_changes_nothing(session: Session, tenant: str) -> None:
    queued, running = submit(session, tenant), submit(session, tenant)
    claim(session, running)

    assert jobs.resume_job(session, tenant, queued).status == JobStatus.QUEUED.value
    assert jobs.resume_job(session, tenant, running).status == JobStatus.RUNNING.value
    session.commit()
    assert len(events(session, queued)) == 1 and len(events(session, running)) == 2


@pytest.mark.parametrize("outcome", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_finished_job_can_neither_pause_nor_resume(
    session: Session, tenant: str, outcome: JobStatus
) -> None:
    job_id = submit(session, tenant)
    attempt = claim(session, job_id)
    assert jobs.transition(session, job_id, outcome, attempt=attempt.attempt)
    session.commit()

    with pytest.raises(JobConflict, match=f"already {outcome.value}; a finished job cannot be "
                                          "paused"):
        jobs.request_pause(session, tenant, job_id)
    with pytest.raises(JobConflict, match="a finished job cannot be resumed"):
        jobs.resume_job(session, tenant, job_id)
    assert row(session, job_id).status == outcome.value


def test_a_running_job_being_cancelled_cannot_be_paused(session: Session, tenant: str) -> None:
    job_id = submit(session, tenant)
    claim(session, job_id)
    jobs.request_cancel(session, tenant, job_id)
    session.commit()

    with pytest.raises(JobConflict, match="is being cancelled"):
        jobs.request_pause(session, tenant, job_id)
    assert not row(session, job_id).pause_requested


def test_a_paused_job_is_cancelled_at_once(session: Session, tenant: str) -> None:
    job_id = submit(session, tenant)
    attempt = claim(session, job_id)
    jobs.request_pause(session, tenant, job_id)
    jobs.hand_back(session, attempt, reason="paused")
    session.commit()

    job = jobs.request_cancel(session, tenant, job_id)
    session.commit()

    assert job.status == JobStatus.CANCELLED.value and job.error == "cancelled by the user"
    assert events(session, job_id)[-1] == ("PAUSED", "CANCELLED", "cancelled by the user")


def test_a_job_whose_worker_pauses_it_ends_cancelled_if_a_cancel_came_first(
    session: Session, tenant: str
) -> None:
    job_id = submit(session, tenant)
    attempt = claim(session, job_id)
    jobs.request_pause(session, tenant, job_id)
    jobs.request_cancel(session, tenant, job_id)
    session.commit()

    assert jobs.hand_back(session, attempt, reason="paused") is JobStatus.CANCELLED


def expire_lease(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id)
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()


def test_a_job_whose_worker_died_with_a_pause_asked_ends_paused_not_requeued(
    session: Session, tenant: str
) -> None:
    job_id = submit(session, tenant)
    claim(session, job_id)
    jobs.request_pause(session, tenant, job_id)
    session.commit()
    expire_lease(session, job_id)

    assert jobs.requeue_expired_leases(session) == [(job_id, JobStatus.PAUSED)]
    session.commit()

    job = row(session, job_id)
    assert job.status == JobStatus.PAUSED.value and not job.pause_requested
    # The lost attempt counts, as a re-queue's does.
    assert (job.attempt, job.max_attempts) == (1, MAX_ATTEMPTS)
    assert jobs.claim_next(session, "w2", 60, device_class="train") is None
    jobs.resume_job(session, tenant, job_id)
    session.commit()
    assert claim(session, job_id).attempt == 2


def test_a_job_that_lost_its_last_attempt_fails_even_with_a_pause_asked(
    session: Session, tenant: str
) -> None:
    job_id = submit(session, tenant)
    for owner in ("w1", "w2"):
        claim(session, job_id, owner)
        expire_lease(session, job_id)
        if owner == "w2":
            jobs.request_pause(session, tenant, job_id)
            session.commit()
        moved = jobs.requeue_expired_leases(session)
        session.commit()

    # Paused with no attempt left, a resume would queue a job nobody may claim.
    assert moved == [(job_id, JobStatus.FAILED)]
    assert not row(session, job_id).pause_requested
