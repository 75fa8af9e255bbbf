"""The job state machine on PostgreSQL: claims, fencing, transitions, from real connections."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import make_engine
from shared.jobs import Claim
from shared.keys import authenticate, create_api_key
from shared.models import Job, JobEvent, JobStatus
from shared.schema import FinetuneRequest
from tests.conftest import make_payload


def queued_job(session: Session) -> Job:
    key = create_api_key(session, "pg-tenant")
    job = jobs.create_job(session, key.tenant_id, FinetuneRequest.model_validate(make_payload()), 3,
                          device_class="train")
    session.commit()
    return session.get_one(Job, job.id)


def claims_at_once(postgres_url: str, n: int, claim: Callable[[Session, str], Claim | None]
                   ) -> list[Claim]:
    """`claim(session, owner)` from `n` threads released together, each on its own
    connection; the claims that won."""
    engine = make_engine(postgres_url)
    won: list[Claim] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        with Session(engine) as session:
            barrier.wait()
            got = claim(session, f"worker-{i}")
            session.commit()
            if got is not None:
                won.append(got)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    return won


def test_twenty_concurrent_claims_give_exactly_one_winner(
    postgres_url: str, pg_session: Session
) -> None:
    job = queued_job(pg_session)
    won = claims_at_once(postgres_url, 20,
                         lambda session, owner: jobs.claim_job(session, job.id, owner, 60))
    assert [claim.attempt for claim in won] == [1]


def expire_lease(session: Session, job_id: str) -> None:
    session.execute(
        update(Job).where(Job.id == job_id)
        .values(lease_expires_at=jobs.utcnow() - timedelta(seconds=1))
    )
    session.commit()


def test_expired_lease_is_requeued_reclaimed_and_fences_the_old_attempt(
    pg_session: Session,
) -> None:
    job = queued_job(pg_session)
    first = jobs.claim_job(pg_session, job.id, "a", 60)
    pg_session.commit()
    assert first is not None
    assert jobs.claim_job(pg_session, job.id, "b", 60) is None
    assert jobs.requeue_expired_leases(pg_session) == []  # the lease still runs
    expire_lease(pg_session, job.id)
    # An expired job is not claimable as it is: only the reaper re-queues, and counts, it.
    assert jobs.claim_job(pg_session, job.id, "b", 60) is None

    assert jobs.requeue_expired_leases(pg_session) == [(job.id, JobStatus.QUEUED)]
    second = jobs.claim_job(pg_session, job.id, "b", 60)
    pg_session.commit()

    assert second is not None and second.attempt == 2
    assert jobs.renew_lease(pg_session, first, 60) == jobs.LeaseRenewal(held=False)
    assert not jobs.transition(pg_session, job.id, JobStatus.COMPLETED, attempt=first.attempt)
    assert jobs.transition(pg_session, job.id, JobStatus.COMPLETED, attempt=second.attempt)
    pg_session.commit()
    pg_session.refresh(job)
    assert job.status == "COMPLETED"
    events = pg_session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
    ).all()
    assert [(e.from_status, e.to_status, e.attempt) for e in events] == [
        (None, "QUEUED", 0),
        ("QUEUED", "RUNNING", 1),
        ("RUNNING", "QUEUED", 1),
        ("QUEUED", "RUNNING", 2),
        ("RUNNING", "COMPLETED", 2),
    ]
    assert "lease of attempt 1 expired" in (events[2].reason or "")


def test_a_lease_renewed_before_the_reaper_commits_keeps_its_job(pg_session: Session) -> None:
    job = queued_job(pg_session)
    claim = jobs.claim_job(pg_session, job.id, "a", 60)
    assert claim is not None
    expire_lease(pg_session, job.id)
    assert jobs.renew_lease(pg_session, claim, 60) == jobs.LeaseRenewal(held=True)
    pg_session.commit()
    assert jobs.requeue_expired_leases(pg_session) == []
    # The same holds when the renewal lands between the reaper's read and its write.
    assert not jobs.transition(pg_session, job.id, JobStatus.QUEUED, attempt=1,
                               lease_expired=True)
    pg_session.refresh(job)
    assert (job.status, job.attempt) == ("RUNNING", 1)


def test_the_last_attempt_lost_fails_the_job_with_the_reason(pg_session: Session) -> None:
    job = queued_job(pg_session)  # max_attempts 3
    for attempt in (1, 2, 3):
        claim = jobs.claim_job(pg_session, job.id, f"w{attempt}", 60)
        assert claim is not None and claim.attempt == attempt
        expire_lease(pg_session, job.id)
        status = JobStatus.QUEUED if attempt < 3 else JobStatus.FAILED
        assert jobs.requeue_expired_leases(pg_session) == [(job.id, status)]
        pg_session.commit()
    pg_session.refresh(job)
    assert job.status == "FAILED" and job.attempt == 3
    assert "worker lost in each of the 3 attempts" in (job.error or "")
    assert jobs.claim_job(pg_session, job.id, "w4", 60) is None


def test_a_cancel_asked_of_a_lost_worker_ends_cancelled(pg_session: Session) -> None:
    job = queued_job(pg_session)
    assert jobs.claim_job(pg_session, job.id, "a", 60) is not None
    pg_session.commit()
    jobs.request_cancel(pg_session, job.tenant_id, job.id)
    expire_lease(pg_session, job.id)
    assert jobs.requeue_expired_leases(pg_session) == [(job.id, JobStatus.CANCELLED)]


def test_jobs_past_the_hard_time_limit_fail_and_others_do_not(pg_session: Session) -> None:
    old, fresh = queued_job(pg_session), queued_job(pg_session)
    for job in (old, fresh):
        assert jobs.claim_job(pg_session, job.id, "w", 3600) is not None
    pg_session.execute(
        update(Job).where(Job.id == old.id)
        .values(attempt_started_at=jobs.utcnow() - timedelta(seconds=120))
    )
    pg_session.commit()
    assert jobs.fail_past_hard_limit(pg_session, hard_limit_s=60) == [old.id]
    pg_session.commit()
    pg_session.refresh(old)
    assert old.status == "FAILED" and "hard time limit of 60 s" in (old.error or "")


def test_claim_next_takes_the_oldest_queued_job_once(postgres_url: str,
                                                     pg_session: Session) -> None:
    first, second = queued_job(pg_session), queued_job(pg_session)
    won = claims_at_once(postgres_url, 6,
                         lambda session, owner: jobs.claim_next(session, owner, 60,
                                                                device_class="train"))
    assert sorted(claim.job_id for claim in won) == sorted([first.id, second.id])


def test_terminal_states_never_change(pg_session: Session) -> None:
    job = queued_job(pg_session)
    assert jobs.transition(pg_session, job.id, JobStatus.CANCELLED, reason="user")
    pg_session.commit()
    for target in JobStatus:
        assert not jobs.transition(pg_session, job.id, target, attempt=0)
        assert not jobs.transition(pg_session, job.id, target)
    assert jobs.claim_job(pg_session, job.id, "late", 60) is None
    pg_session.refresh(job)
    assert job.status == "CANCELLED"


def test_a_queued_job_cannot_jump_to_completed(pg_session: Session) -> None:
    job = queued_job(pg_session)
    with pytest.raises(jobs.IllegalTransition):
        jobs.transition(pg_session, job.id, JobStatus.COMPLETED)


def test_keys_authenticate_on_postgres(pg_session: Session) -> None:
    created = create_api_key(pg_session, "svc")
    pg_session.commit()
    assert authenticate(pg_session, created.plaintext) is not None
    assert authenticate(pg_session, created.plaintext + "x") is None


def test_a_dead_owners_jobs_move_at_once_and_no_other_owners(pg_session: Session) -> None:
    dead, other = queued_job(pg_session), queued_job(pg_session)
    assert jobs.claim_job(pg_session, dead.id, "host:101", 600) is not None
    assert jobs.claim_job(pg_session, other.id, "host:102", 600) is not None
    pg_session.commit()

    moved = jobs.requeue_dead_owner(pg_session, "host:101", "worker pid 101 exited by SIGKILL")
    pg_session.commit()

    assert moved == [(dead.id, JobStatus.QUEUED)]
    pg_session.refresh(dead)
    pg_session.refresh(other)
    assert (dead.status, dead.attempt, dead.lease_owner) == ("QUEUED", 1, None)
    assert (other.status, other.lease_owner) == ("RUNNING", "host:102")
    reason = pg_session.scalars(select(JobEvent.reason).where(JobEvent.job_id == dead.id)
                                .order_by(JobEvent.id.desc())).first()
    assert reason == "worker pid 101 exited by SIGKILL; attempt 1 lost, re-queued"
    again = jobs.claim_job(pg_session, dead.id, "host:103", 600)
    pg_session.commit()
    assert again is not None and again.attempt == 2
    assert jobs.requeue_dead_owner(pg_session, "host:101", "again") == []


def test_a_dead_owner_and_the_reaper_moving_the_same_job_at_once_move_it_once(
    postgres_url: str, pg_session: Session
) -> None:
    # The supervisor that saw the worker die and the sweep that saw its lease expire race on
    # the job: the fence on the attempt lets one of them move it.
    job = queued_job(pg_session)
    assert jobs.claim_job(pg_session, job.id, "host:201", 60) is not None
    pg_session.commit()
    expire_lease(pg_session, job.id)
    engine = make_engine(postgres_url)
    barrier = threading.Barrier(2)
    moves: list[list[tuple[str, JobStatus]]] = []

    def mover(move: Callable[[Session], list[tuple[str, JobStatus]]]) -> None:
        with Session(engine) as session:
            barrier.wait()
            moves.append(move(session))
            session.commit()

    threads = [
        threading.Thread(target=mover, args=(jobs.requeue_expired_leases,)),
        threading.Thread(target=mover, args=(
            lambda s: jobs.requeue_dead_owner(s, "host:201", "worker pid 201 exited by SIGKILL"),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()

    assert sorted(len(m) for m in moves) == [0, 1]
    pg_session.refresh(job)
    assert (job.status, job.attempt) == ("QUEUED", 1)
    requeues = pg_session.scalars(select(JobEvent).where(JobEvent.job_id == job.id,
                                                         JobEvent.to_status == "QUEUED")).all()
    assert len(requeues) == 2  # the submit's, and one re-queue
