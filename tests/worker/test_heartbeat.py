"""The attempt's heartbeat and reporter against a real database that goes away: lease renewal,
cancel, pause, the worker's shutdown, a lost lease, a database outage shorter and longer than the
lease, time limits, and reports kept in memory until the database is back.

The outage is real: the settings are pointed at a PostgreSQL port where nothing listens, so
every connection is refused as it is when the server is down. The clock is a fake so that
"longer than a lease" needs no waiting."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from shared import jobs
from shared.db import reset_engines, session_scope
from shared.jobs import Claim
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobLog, JobMetric, utcnow
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from tests.conftest import make_payload
from tests.fake_clock import FakeClock
from worker import shutdown
from worker.heartbeat import Heartbeat
from worker.job_reporter import DatabaseReporter
from worker.pipeline.errors import StopReason

LEASE_S = 30.0
UNREACHABLE_DB = "postgresql+psycopg://postgres@127.0.0.1:9/down"


@pytest.fixture
def claim(tunery_env: Path) -> Claim:
    upgrade_database(get_settings().database.url)
    with session_scope() as session:
        tenant = create_api_key(session, "hb").tenant_id
        job_id = jobs.create_job(
            session, tenant, FinetuneRequest.model_validate(make_payload()), 3, device_class="train"
        ).id
        claimed = jobs.claim_job(session, job_id, "w", int(LEASE_S))
    assert claimed is not None
    return claimed


@pytest.fixture
def outage(monkeypatch: pytest.MonkeyPatch, tunery_env: Path) -> Iterator[object]:
    """Call `outage.start()` / `outage.end()` to take the database away and give it back."""
    real_url = get_settings().database.url

    class Outage:
        def start(self) -> None:
            monkeypatch.setenv("TUNERY_DATABASE_URL", UNREACHABLE_DB)
            get_settings.cache_clear()
            reset_engines()

        def end(self) -> None:
            monkeypatch.setenv("TUNERY_DATABASE_URL", real_url)
            get_settings.cache_clear()
            reset_engines()

    yield Outage()


def heartbeat(claim: Claim, clock: FakeClock, **limits: float) -> Heartbeat:
    return Heartbeat(
        claim, lease_seconds=LEASE_S, every_s=1.0,
        soft_limit_s=limits.get("soft", 3600.0), hard_limit_s=limits.get("hard", 7200.0),
        on_hard_limit=limits.get("on_hard", lambda: None),  # type: ignore[arg-type]
        clock=clock,
    )


def lease_expiry(job_id: str):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return session.get_one(Job, job_id).lease_expires_at


def test_a_beat_extends_the_lease_and_keeps_training_going(claim: Claim) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == claim.job_id)
                        .values(lease_expires_at=utcnow() + timedelta(seconds=1)))
    beat = heartbeat(claim, FakeClock())
    beat.beat()
    expiry = lease_expiry(claim.job_id)
    assert expiry is not None
    remaining = (expiry.replace(tzinfo=None) - utcnow().replace(tzinfo=None)).total_seconds()
    assert remaining > LEASE_S - 5
    assert beat.stop_reason is None


def test_a_cancel_is_seen_at_the_next_beat(claim: Claim) -> None:
    beat = heartbeat(claim, FakeClock())
    with session_scope() as session:
        tenant = session.get_one(Job, claim.job_id).tenant_id
        jobs.request_cancel(session, tenant, claim.job_id)
    beat.beat()
    assert beat.stop_reason == StopReason.CANCELLED


def test_the_worker_stopping_is_seen_at_the_next_beat_and_a_cancel_seen_with_it_wins(
    claim: Claim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutdown, "_shutting_down", False)
    first = heartbeat(claim, FakeClock())
    first.beat()
    assert first.stop_reason is None

    shutdown.begin_shutdown()  # as Celery's SIGTERM does
    first.beat()
    assert first.stop_reason == StopReason.WORKER_STOPPING
    both = heartbeat(claim, FakeClock())
    with session_scope() as session:
        tenant = session.get_one(Job, claim.job_id).tenant_id
        jobs.request_cancel(session, tenant, claim.job_id)
    both.beat()
    assert both.stop_reason == StopReason.CANCELLED


def test_a_pause_is_seen_at_the_next_beat_and_a_cancel_seen_with_it_wins(
    claim: Claim,
) -> None:
    paused, both = heartbeat(claim, FakeClock()), heartbeat(claim, FakeClock())
    with session_scope() as session:
        tenant = session.get_one(Job, claim.job_id).tenant_id
        jobs.request_pause(session, tenant, claim.job_id)
    paused.beat()
    assert paused.stop_reason == StopReason.PAUSED

    with session_scope() as session:
        jobs.request_cancel(session, tenant, claim.job_id)
    both.beat()
    assert both.stop_reason == StopReason.CANCELLED


def test_a_pause_withdrawn_before_the_next_beat_stops_nothing(claim: Claim) -> None:
    beat = heartbeat(claim, FakeClock())
    with session_scope() as session:
        tenant = session.get_one(Job, claim.job_id).tenant_id
        jobs.request_pause(session, tenant, claim.job_id)
    with session_scope() as session:
        jobs.resume_job(session, tenant, claim.job_id)
    beat.beat()
    assert beat.stop_reason is None


def test_a_job_requeued_by_the_reaper_stops_the_old_attempt(claim: Claim) -> None:
    beat = heartbeat(claim, FakeClock())
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == claim.job_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope() as session:
        jobs.requeue_expired_leases(session)
    beat.beat()
    assert beat.stop_reason == StopReason.LEASE_LOST


def test_an_outage_shorter_than_the_lease_stops_nothing_a_longer_one_stops_training(
    claim: Claim, outage: object
) -> None:
    clock = FakeClock()
    beat = heartbeat(claim, clock)
    beat.beat()
    outage.start()  # type: ignore[attr-defined]
    clock.now += LEASE_S / 2
    beat.beat()
    assert beat.stop_reason is None
    clock.now += LEASE_S / 2  # a whole lease without a renewal: the reaper may have moved on
    beat.beat()
    assert beat.stop_reason == StopReason.LEASE_LOST


def test_an_outage_that_ends_in_time_lets_the_lease_be_renewed(
    claim: Claim, outage: object
) -> None:
    clock = FakeClock()
    beat = heartbeat(claim, clock)
    outage.start()  # type: ignore[attr-defined]
    clock.now += LEASE_S - 1
    beat.beat()
    outage.end()  # type: ignore[attr-defined]
    clock.now += 0.5
    beat.beat()
    clock.now += LEASE_S - 1  # measured from the renewal that worked, not from the claim
    beat.beat()
    assert beat.stop_reason is None


def test_the_soft_limit_asks_for_a_stop_and_the_hard_limit_acts(claim: Claim) -> None:
    clock, hard_hits = FakeClock(), []
    beat = heartbeat(claim, clock, soft=10, hard=20, on_hard=lambda: hard_hits.append(1))
    clock.now += 9
    beat.beat()
    assert beat.stop_reason is None
    clock.now += 1
    beat.beat()
    assert beat.stop_reason == StopReason.TIMEOUT and hard_hits == []
    clock.now += 10
    beat.beat()
    assert hard_hits == [1]


def test_reports_wait_in_memory_during_an_outage_and_arrive_in_order(
    claim: Claim, outage: object
) -> None:
    reporter = DatabaseReporter(claim, heartbeat(claim, FakeClock()))
    reporter.log("before")
    outage.start()  # type: ignore[attr-defined]
    reporter.log("during 1")
    reporter.metric(7, {"loss": 1.5})
    reporter.log("during 2")
    assert not reporter.flush()
    outage.end()  # type: ignore[attr-defined]

    assert reporter.flush()

    with session_scope() as session:
        lines = session.scalars(
            select(JobLog.line).where(JobLog.job_id == claim.job_id).order_by(JobLog.id)
        ).all()
        metrics = session.scalars(select(JobMetric).where(JobMetric.job_id == claim.job_id)).all()
    assert lines == ["before", "during 1", "during 2"]
    assert [(m.step, m.values) for m in metrics] == [(7, {"loss": 1.5})]


def counted(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_renewals_and_a_lost_lease_are_counted_for_prometheus(claim: Claim) -> None:
    renewed = counted("tunery_worker_lease_renewals_total", result="renewed")
    refused = counted("tunery_worker_lease_renewals_total", result="refused")
    lost = counted("tunery_worker_leases_lost_total")
    beat = heartbeat(claim, FakeClock())
    beat.beat()
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == claim.job_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope() as session:
        jobs.requeue_expired_leases(session)
    beat.beat()
    beat.beat()

    assert counted("tunery_worker_lease_renewals_total", result="renewed") == renewed + 1
    assert counted("tunery_worker_lease_renewals_total", result="refused") == refused + 2
    assert counted("tunery_worker_leases_lost_total") == lost + 1  # one attempt, one loss


def test_renewals_in_an_outage_are_counted_and_the_lease_lost_past_it_too(
    claim: Claim, outage: object
) -> None:
    unreachable = counted("tunery_worker_lease_renewals_total", result="unreachable")
    lost = counted("tunery_worker_leases_lost_total")
    clock = FakeClock()
    beat = heartbeat(claim, clock)
    outage.start()  # type: ignore[attr-defined]
    clock.now += LEASE_S / 2
    beat.beat()
    assert counted("tunery_worker_leases_lost_total") == lost
    clock.now += LEASE_S / 2
    beat.beat()

    assert counted("tunery_worker_lease_renewals_total", result="unreachable") == unreachable + 2
    assert counted("tunery_worker_leases_lost_total") == lost + 1


def test_a_stale_lease_is_renewed_on_asking_and_lost_once_the_renewal_is_refused(
    claim: Claim,
) -> None:
    clock = FakeClock()
    beat = heartbeat(claim, clock)
    assert beat.holds_lease()
    clock.now += LEASE_S + 1  # a process stopped (SIGSTOP) past its lease, then continued
    assert beat.holds_lease()  # nobody took the job meanwhile: renewed on asking
    assert beat.last_renewed_at == clock.now and beat.stop_reason is None
    clock.now += LEASE_S + 1
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == claim.job_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope() as session:
        jobs.requeue_expired_leases(session)  # the reaper gave the job to a new attempt
    assert not beat.holds_lease()  # the renewal on asking is refused
    assert beat.stop_reason is StopReason.LEASE_LOST
