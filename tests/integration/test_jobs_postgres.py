"""The job state machine on PostgreSQL: claims, fencing, transitions, from real connections."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import make_engine
from shared.keys import authenticate, create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobStatus
from shared.schema import FinetuneRequest
from tests.conftest import make_payload


@pytest.fixture
def pg_session(postgres_url: str):  # type: ignore[no-untyped-def]
    upgrade_database(postgres_url)
    engine = make_engine(postgres_url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


def queued_job(session: Session) -> Job:
    key = create_api_key(session, "pg-tenant")
    job = jobs.create_job(session, key.tenant_id, FinetuneRequest.model_validate(make_payload()), 3)
    session.commit()
    return job


def test_twenty_concurrent_claims_give_exactly_one_winner(
    postgres_url: str, pg_session: Session
) -> None:
    job = queued_job(pg_session)
    engine = make_engine(postgres_url)
    winners: list[int] = []
    barrier = threading.Barrier(20)

    def claim(i: int) -> None:
        with Session(engine) as session:
            barrier.wait()
            got = jobs.claim_job(session, job.id, f"worker-{i}", 60)
            session.commit()
            if got is not None:
                winners.append(got.attempt)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert winners == [1]


def test_expired_lease_can_be_reclaimed_and_fences_the_old_attempt(pg_session: Session) -> None:
    job = queued_job(pg_session)
    first = jobs.claim_job(pg_session, job.id, "a", 60)
    pg_session.commit()
    assert first is not None
    assert jobs.claim_job(pg_session, job.id, "b", 60) is None
    pg_session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(lease_expires_at=jobs.utcnow() - timedelta(seconds=1))
    )
    second = jobs.claim_job(pg_session, job.id, "b", 60)
    pg_session.commit()
    assert second is not None and second.attempt == 2
    assert jobs.renew_lease(pg_session, first, 60) == (False, False)
    assert not jobs.transition(pg_session, job.id, JobStatus.COMPLETED, attempt=first.attempt)
    assert jobs.transition(pg_session, job.id, JobStatus.COMPLETED, attempt=second.attempt)
    pg_session.commit()
    pg_session.refresh(job)
    assert job.status == "COMPLETED"


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
