"""The maintenance sweep on the embedded default: SQLite and the kombu SQLite broker, as
`tunery up` runs it, with real messages counted in the broker."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

import shared.maintenance as maintenance
from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.maintenance import MaintenanceLoop, sweep, wake_queued_jobs
from shared.migrate import upgrade_database
from shared.models import ApiKey, IdempotencyKey, Job, JobEvent, JobStatus, utcnow
from shared.queue import count_waiting_messages, declare_queue, enqueue_training
from shared.schema import FinetuneRequest
from shared.settings import Settings, get_settings
from tests.conftest import make_payload


def submit(n: int) -> list[str]:
    with session_scope() as session:
        tenant = create_api_key(session, "sweep").tenant_id
        request = FinetuneRequest.model_validate(make_payload())
        return [jobs.create_job(session, tenant, request, max_attempts=2,
                                device_class="train").id for _ in range(n)]


def embedded(tunery_env: Path) -> Settings:
    settings = get_settings()
    upgrade_database(settings.database.url)
    declare_queue()
    return settings


def test_queued_jobs_without_a_message_get_exactly_the_missing_wake_ups(
    tunery_env: Path,
) -> None:
    embedded(tunery_env)
    first, second, third = submit(3)
    assert enqueue_training(first, "train")  # the other two submits lost their message

    woken = wake_queued_jobs()

    assert woken == [first, second]  # one missing per queued job beyond the one message
    assert count_waiting_messages("train") == 3
    assert wake_queued_jobs() == []  # nothing missing: a second sweep sends nothing


def test_cancelled_and_running_jobs_get_no_wake_up(tunery_env: Path) -> None:
    settings = embedded(tunery_env)
    running, cancelled = submit(2)
    with session_scope() as session:
        assert jobs.claim_job(session, running, "w", settings.leases.lease_seconds) is not None
        tenant = session.get_one(Job, cancelled).tenant_id
        jobs.request_cancel(session, tenant, cancelled)
    assert wake_queued_jobs() == []
    assert count_waiting_messages("train") == 0


def test_sweep_requeues_a_dead_workers_job_and_wakes_it(tunery_env: Path) -> None:
    settings = embedded(tunery_env)
    (job_id,) = submit(1)
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "dead-worker", settings.leases.lease_seconds)
        session.execute(
            update(Job).where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )

    result = sweep(settings)

    assert result.requeued == [job_id] and result.woken == [job_id]
    assert count_waiting_messages("train") == 1
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.attempt, job.lease_owner) == ("QUEUED", 1, None)
        again = jobs.claim_job(session, job_id, "new-worker", settings.leases.lease_seconds)
    assert again is not None and again.attempt == 2


@pytest.mark.parametrize("outcome", [JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_lost_attempt_cannot_end_the_job_the_sweep_requeued(
    tunery_env: Path, outcome: JobStatus
) -> None:
    # Found by the state-machine test: the job keeps the lost attempt's number until the next
    # claim, so fencing on the number alone let that attempt's late outcome end a QUEUED job.
    settings = embedded(tunery_env)
    (job_id,) = submit(1)
    with session_scope() as session:
        lost = jobs.claim_job(session, job_id, "lost-worker", settings.leases.lease_seconds)
        assert lost is not None
        session.execute(
            update(Job).where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert sweep(settings).requeued == [job_id]

    with session_scope() as session:
        recorded = jobs.transition(session, job_id, outcome, attempt=lost.attempt,
                                   reason="the lost attempt's late outcome")

    assert recorded is False
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert (job.status, job.error) == ("QUEUED", None)
        assert jobs.claim_job(session, job_id, "new-worker", settings.leases.lease_seconds)


def test_the_loop_survives_a_failing_sweep_and_stops_when_asked(
    tunery_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = embedded(tunery_env)
    settings = base.model_copy(
        update={"leases": base.leases.model_copy(update={"reaper_interval_s": 0.05})}
    )
    calls: list[int] = []

    def flaky(_: Settings) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("database is down")

    monkeypatch.setattr(maintenance, "sweep", flaky)
    loop = MaintenanceLoop(settings)
    loop.start()
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop()
    loop.join(timeout=2)

    assert len(calls) >= 3, "the loop ended after the failed sweep"
    assert not loop.is_alive()


def test_job_status_after_sweep_of_last_attempt_is_failed(tunery_env: Path) -> None:
    settings = embedded(tunery_env)
    (job_id,) = submit(1)  # max_attempts 2
    for owner in ("w1", "w2"):
        with session_scope() as session:
            assert jobs.claim_job(session, job_id, owner, settings.leases.lease_seconds)
            session.execute(
                update(Job).where(Job.id == job_id)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
        sweep(settings)
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.FAILED.value
        assert "worker lost in each of the 2 attempts allowed (last: w2)" in (job.error or "")
    assert count_waiting_messages("train") == 1  # only the wake-up sent after the first loss


def test_sweep_forgets_idempotency_keys_past_their_ttl(tunery_env: Path) -> None:
    settings = embedded(tunery_env)
    old_job, new_job = submit(2)
    with session_scope() as session:
        key_id = session.scalars(select(ApiKey.id)).first()
        for job_id, age in ((old_job, settings.limits.idempotency_ttl_s + 60), (new_job, 60)):
            session.add(IdempotencyKey(
                api_key_id=key_id, key=f"k-{job_id}", request_hash="h", job_id=job_id,
                response_status=201, response_body={}, created_at=utcnow() - timedelta(seconds=age),
            ))

    assert sweep(settings).expired_keys == 1

    with session_scope() as session:
        assert session.scalars(select(IdempotencyKey.job_id)).all() == [new_job]


def claimed_by(job_id: str, pid: int) -> None:
    with session_scope() as session:
        # A lease that runs for minutes still: only the worker's death says it is lost.
        assert jobs.claim_job(session, job_id, jobs.worker_identity(pid), 600)


def test_a_dead_workers_job_is_requeued_at_once_with_how_it_died_and_woken(
    tunery_env: Path,
) -> None:
    embedded(tunery_env)
    dead, alive = submit(2)
    claimed_by(dead, 4242)
    claimed_by(alive, 4243)

    moved = maintenance.release_dead_worker(4242, "worker pid 4242 exited by SIGKILL")

    assert moved == [(dead, JobStatus.QUEUED)]
    assert count_waiting_messages("train") == 1  # the wake-up for the re-queued job
    with session_scope() as session:
        job = session.get_one(Job, dead)
        assert (job.status, job.attempt, job.lease_owner) == ("QUEUED", 1, None)
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == dead)
                                .order_by(JobEvent.id.desc())).first()
        assert event is not None and (event.to_status, event.attempt) == ("QUEUED", 1)
        assert event.reason == "worker pid 4242 exited by SIGKILL; attempt 1 lost, re-queued"
        assert session.get_one(Job, alive).status == "RUNNING"
        # The lost attempt counts, as for an expired lease: the next claim is attempt 2.
        again = jobs.claim_job(session, dead, "new-worker", 60)
    assert again is not None and again.attempt == 2
    assert maintenance.release_dead_worker(4242, "worker pid 4242 exited by SIGKILL") == []


@pytest.mark.parametrize(("asked", "expected", "reason"), [
    ("cancel", JobStatus.CANCELLED, "cancelled by the user; worker pid 7 exited by SIGKILL"),
    ("pause", JobStatus.PAUSED, "was lost before it paused (worker pid 7 exited by SIGKILL)"),
    ("nothing, on the last attempt", JobStatus.FAILED,
     "worker lost in each of the 2 attempts allowed (last: {owner}; worker pid 7 exited by "
     "SIGKILL)"),
])
def test_a_dead_workers_job_follows_the_rules_of_an_expired_lease(
    tunery_env: Path, asked: str, expected: JobStatus, reason: str
) -> None:
    embedded(tunery_env)
    (job_id,) = submit(1)  # max_attempts 2
    if asked.endswith("last attempt"):
        claimed_by(job_id, 6)
        assert maintenance.release_dead_worker(6, "worker pid 6 exited by SIGKILL") == [
            (job_id, JobStatus.QUEUED)]
    claimed_by(job_id, 7)
    with session_scope() as session:
        tenant = session.get_one(Job, job_id).tenant_id
        if asked == "cancel":
            jobs.request_cancel(session, tenant, job_id)
        elif asked == "pause":
            jobs.request_pause(session, tenant, job_id)

    assert maintenance.release_dead_worker(7, "worker pid 7 exited by SIGKILL") == [
        (job_id, expected)]

    with session_scope() as session:
        job = session.get_one(Job, job_id)
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                .order_by(JobEvent.id.desc())).first()
        assert job.status == expected.value and job.lease_owner is None
        assert event is not None
        assert reason.format(owner=jobs.worker_identity(7)) in (event.reason or ""), event.reason


TWO_CLASSES = '[{"name": "small", "devices": 1}, {"name": "pair", "devices": 2}]'


def submit_to(device_class: str) -> str:
    with session_scope() as session:
        tenant = create_api_key(session, f"sweep-{device_class}").tenant_id
        return jobs.create_job(session, tenant, FinetuneRequest.model_validate(make_payload()),
                               max_attempts=2, device_class=device_class).id


def with_classes(monkeypatch: pytest.MonkeyPatch, classes: str) -> Settings:
    from shared.queue import get_celery

    monkeypatch.setenv("TUNERY_DEVICE_CLASSES", classes)
    get_settings.cache_clear()
    get_celery.cache_clear()
    settings = get_settings()
    upgrade_database(settings.database.url)
    declare_queue()
    return settings


def test_each_class_s_queue_gets_the_wake_ups_of_its_own_jobs(
    tunery_env: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_classes(monkeypatch, TWO_CLASSES)
    small, pair, second_pair = submit_to("small"), submit_to("pair"), submit_to("pair")
    assert enqueue_training(pair, "pair")  # the other two lost theirs

    woken = wake_queued_jobs()

    # Pair's queue held one message for its two jobs: one more, named after the oldest.
    assert woken == [small, pair] and second_pair not in woken
    assert (count_waiting_messages("small"), count_waiting_messages("pair")) == (1, 2)
    assert count_waiting_messages("train") == 0  # no class of that name any more
    assert wake_queued_jobs() == []


def test_a_job_whose_class_was_removed_is_told_so_once_and_gets_no_wake_up(
    tunery_env: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = with_classes(monkeypatch, TWO_CLASSES)
    stranded, served = submit_to("pair"), submit_to("small")
    settings = with_classes(monkeypatch, '[{"name": "small", "devices": 1}]')

    first, second = sweep(settings), sweep(settings)

    assert first.unserved == [stranded] and second.unserved == []
    assert first.woken == [served]
    warning = ("device class 'pair' is not configured on this service (its "
               "TUNERY_DEVICE_CLASSES has small): no worker takes this job until an operator "
               "adds the class back; cancel it and submit it again to route it to a class "
               "there is")
    with session_scope() as session:
        job = session.get_one(Job, stranded)
        assert (job.status, job.warnings) == ("QUEUED", [warning])
        assert [log.line for log in jobs.tail_logs(session, stranded, 10)] == [warning]
        assert session.get_one(Job, served).warnings is None
    assert count_waiting_messages("pair") == 0

    # The class comes back: the job's wake-up is sent again.
    settings = with_classes(monkeypatch, TWO_CLASSES)
    assert sweep(settings).woken == [stranded]
