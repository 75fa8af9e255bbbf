"""Pause and resume racing a worker's transaction on PostgreSQL, from real connections: the
user's call waits for the worker's row lock and then decides on what the worker committed,
so no job is left QUEUED with a pause nobody acts on, or PAUSED after a resume."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import make_engine
from shared.jobs import Claim
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobStatus
from shared.schema import FinetuneRequest
from tests.conftest import make_payload

# How long the user's call is watched to be sure it waits on the worker's lock.
BLOCKED_S = 0.5


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    upgrade_database(postgres_url)
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def running_job(engine: Engine, *, pause: bool = False) -> tuple[str, str, Claim]:
    with Session(engine) as session:
        tenant = create_api_key(session, "racer").tenant_id
        request = FinetuneRequest.model_validate(make_payload())
        job_id = jobs.create_job(session, tenant, request, 3, device_class="train").id
        session.commit()
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        if pause:
            jobs.request_pause(session, tenant, job_id)
        session.commit()
    return tenant, job_id, claim


def while_locked(engine: Engine, worker: Callable[[Session], object],
                 user: Callable[[Session], Job]) -> Job:
    """`worker` runs in a transaction left open; `user` runs on another connection meanwhile
    and must wait for it; the worker commits; returns what `user` answered."""
    answered: list[Job] = []

    def user_call() -> None:
        with Session(engine, expire_on_commit=False) as session:
            answered.append(user(session))
            session.commit()

    with Session(engine) as worker_session:
        worker(worker_session)
        thread = threading.Thread(target=user_call)
        thread.start()
        thread.join(BLOCKED_S)
        assert thread.is_alive(), "the user's call did not wait for the worker's transaction"
        worker_session.commit()
    thread.join(10)
    assert answered
    return answered[0]


def status(engine: Engine, job_id: str) -> Job:
    with Session(engine, expire_on_commit=False) as session:
        return session.get_one(Job, job_id)


def test_a_pause_waiting_on_a_hand_back_pauses_the_job_it_finds_queued(engine: Engine) -> None:
    tenant, job_id, claim = running_job(engine)

    answer = while_locked(
        engine,
        lambda s: jobs.hand_back(s, claim, reason="worker stopping"),
        lambda s: jobs.request_pause(s, tenant, job_id),
    )

    job = status(engine, job_id)
    assert answer.status == job.status == JobStatus.PAUSED.value
    assert not job.pause_requested


def test_a_resume_waiting_on_the_workers_pause_queues_the_job_again(engine: Engine) -> None:
    tenant, job_id, claim = running_job(engine, pause=True)

    answer = while_locked(
        engine,
        lambda s: jobs.hand_back(s, claim, reason="unused"),
        lambda s: jobs.resume_job(s, tenant, job_id),
    )

    job = status(engine, job_id)
    assert answer.status == job.status == JobStatus.QUEUED.value
    assert job.max_attempts == 4  # the paused attempt was given back


def test_a_worker_pausing_after_a_resume_withdrew_the_pause_queues_the_job(
    engine: Engine,
) -> None:
    tenant, job_id, claim = running_job(engine, pause=True)
    moved: list[JobStatus | None] = []

    while_locked(
        engine,
        lambda s: jobs.resume_job(s, tenant, job_id),
        lambda s: moved.append(jobs.hand_back(s, claim, reason="resumed while pausing"))
        or s.get_one(Job, job_id),
    )

    assert moved == [JobStatus.QUEUED]
    assert status(engine, job_id).status == JobStatus.QUEUED.value


def test_a_claim_waiting_on_a_pause_of_the_queued_job_claims_nothing(engine: Engine) -> None:
    with Session(engine) as session:
        tenant = create_api_key(session, "racer").tenant_id
        job_id = jobs.create_job(
            session, tenant, FinetuneRequest.model_validate(make_payload()), 3, device_class="train"
        ).id
        session.commit()
    claims: list[Claim | None] = []

    while_locked(
        engine,
        lambda s: jobs.request_pause(s, tenant, job_id),
        lambda s: claims.append(jobs.claim_job(s, job_id, "w", 60)) or s.get_one(Job, job_id),
    )

    assert claims == [None]
    assert status(engine, job_id).status == JobStatus.PAUSED.value
