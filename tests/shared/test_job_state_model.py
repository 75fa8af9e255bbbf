"""A hypothesis state machine over the real job functions on a real database (SQLite file):
workers claim, renew, finish, die and come back stale; users submit, cancel, pause and
resume; the reaper sweeps; stopping or pausing workers hand their jobs back. After every step:

- at most one live lease per job, held by the attempt the row names;
- every recorded transition is one `ALLOWED` permits;
- a terminal state never changes;
- COMPLETED implies the job's adapter is in storage;
- no job has more attempts than `max_attempts`;
- no QUEUED job carries a cancel (nobody would claim or cancel it);
- only a RUNNING job carries a pause (its worker is the one to act on it);
- a QUEUED or PAUSED job has an attempt left (resumed, it would otherwise never run);
- every recorded transition is news for webhooks: one delivery of its event, no more.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import make_engine
from shared.jobs import ALLOWED, Claim
from shared.keys import create_api_key
from shared.models import (
    TERMINAL_STATUSES,
    Base,
    Job,
    JobEvent,
    JobStatus,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from shared.schema import FinetuneRequest
from shared.storage import LocalStorage
from shared.storage_keys import job_artifact_key
from shared.webhooks.events import EVENT_TYPES, STATUS_EVENTS
from tests.conftest import make_payload

MAX_ATTEMPTS = 2
LEASE_S = 60
REQUEST = FinetuneRequest.model_validate(make_payload())


def adapter_key(job_id: str) -> str:
    return job_artifact_key(job_id, "adapter_model.safetensors")


class JobLifecycle(RuleBasedStateMachine):
    jobs_ = Bundle("jobs")
    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        self.terminal: dict[str, str] = {}

    @initialize()
    def open_database(self) -> None:
        root = Path(tempfile.mkdtemp(dir=self._base))
        # The schema from the models: the migrations that build it are tested on their own.
        self.engine = make_engine(f"sqlite:///{root / 'jobs.db'}")
        Base.metadata.create_all(self.engine)
        self.session = Session(self.engine, expire_on_commit=False)
        self.tenant = create_api_key(self.session, "model").tenant_id
        # Takes every event; nothing is sent here, so its secret is never read.
        self.session.add(WebhookEndpoint(
            id="we_model", tenant_id=self.tenant, name="model", url="https://hooks.example",
            event_types=list(EVENT_TYPES), secret="enc:v1:unread", secret_hint=""))
        self.session.commit()
        self.storage = LocalStorage(root / "storage")

    def teardown(self) -> None:
        if hasattr(self, "session"):
            self.session.close()
            self.engine.dispose()

    @rule(target=jobs_)
    def submit(self) -> str:
        job = jobs.create_job(self.session, self.tenant, REQUEST, max_attempts=MAX_ATTEMPTS,
                              device_class="train")
        self.session.commit()
        return job.id

    @rule(target=claims, job_id=jobs_, worker=st.sampled_from(["w1", "w2", "w3"]))
    def claim(self, job_id: str, worker: str) -> Claim | None:
        before = self.session.get_one(Job, job_id, populate_existing=True)
        claimable = (before.status == "QUEUED" and not before.cancel_requested
                     and before.attempt < before.max_attempts)
        attempt = before.attempt
        claim = jobs.claim_job(self.session, job_id, worker, LEASE_S)
        self.session.commit()
        assert (claim is not None) == claimable
        assert claim is None or claim.attempt == attempt + 1
        return claim

    @rule(target=claims, worker=st.sampled_from(["w1", "w2"]))
    def wake_up(self, worker: str) -> Claim | None:
        claim = jobs.claim_next(self.session, worker, LEASE_S, device_class="train")
        self.session.commit()
        return claim

    @rule(claim=claims)
    def heartbeat(self, claim: Claim | None) -> None:
        if claim is None:
            return
        held = jobs.renew_lease(self.session, claim, LEASE_S).held
        self.session.commit()
        job = self.session.get_one(Job, claim.job_id, populate_existing=True)
        # A renewal succeeds exactly when this attempt still runs the job.
        assert held == (job.status == "RUNNING" and job.attempt == claim.attempt)

    @rule(claim=consumes(claims), outcome=st.sampled_from(
        [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED]
    ))
    def finish(self, claim: Claim | None, outcome: JobStatus) -> None:
        if claim is None:
            return
        if outcome is JobStatus.COMPLETED:
            # As the worker does: upload first, then record the outcome fenced on the attempt.
            self.storage.put_bytes(adapter_key(claim.job_id), f"{claim}".encode())
        job = self.session.get_one(Job, claim.job_id, populate_existing=True)
        owns = job.status == "RUNNING" and job.attempt == claim.attempt
        recorded = jobs.transition(self.session, claim.job_id, outcome, attempt=claim.attempt)
        self.session.commit()
        # Only the attempt that runs the job records its outcome; a stale one changes nothing.
        assert recorded == owns

    @rule(claim=consumes(claims))
    def worker_stops(self, claim: Claim | None) -> None:
        """Its worker shuts down, or saw a pause, and hands the job back."""
        if claim is None:
            return
        job = self.session.get_one(Job, claim.job_id, populate_existing=True)
        owns = job.status == "RUNNING" and job.attempt == claim.attempt
        cancel, pause, max_attempts = job.cancel_requested, job.pause_requested, job.max_attempts
        moved = jobs.hand_back(self.session, claim, reason="worker stopping")
        self.session.commit()
        job = self.session.get_one(Job, claim.job_id, populate_existing=True)
        if not owns:
            assert moved is None
        elif cancel:
            assert moved is JobStatus.CANCELLED and job.status == "CANCELLED"
        else:
            # Claimable again (once resumed, if paused), the attempt it used given back.
            expected = JobStatus.PAUSED if pause else JobStatus.QUEUED
            assert moved is expected and job.status == expected.value
            assert job.max_attempts == max_attempts + 1

    @rule(job_id=jobs_)
    def worker_dies(self, job_id: str) -> None:
        """Its lease runs out: time passes without a heartbeat."""
        self.session.execute(
            update(Job).where(Job.id == job_id, Job.status == "RUNNING")
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        self.session.commit()

    @rule()
    def reaper(self) -> None:
        jobs.requeue_expired_leases(self.session)
        self.session.commit()

    @rule(job_id=jobs_)
    def cancel(self, job_id: str) -> None:
        try:
            jobs.request_cancel(self.session, self.tenant, job_id)
        except jobs.JobConflict:
            job = self.session.get_one(Job, job_id, populate_existing=True)
            assert job.status in {s.value for s in TERMINAL_STATUSES}
        self.session.commit()

    @rule(job_id=jobs_)
    def pause(self, job_id: str) -> None:
        before = self.session.get_one(Job, job_id, populate_existing=True)
        status, cancel = before.status, before.cancel_requested
        try:
            job = jobs.request_pause(self.session, self.tenant, job_id)
        except jobs.JobConflict:
            assert status in {s.value for s in TERMINAL_STATUSES} or cancel
        else:
            # A queued job pauses at once; a running one when its worker gets to it.
            assert job.status == {"QUEUED": "PAUSED"}.get(status, status)
            assert job.pause_requested == (status == "RUNNING")
        self.session.commit()

    @rule(job_id=jobs_)
    def resume(self, job_id: str) -> None:
        status = self.session.get_one(Job, job_id, populate_existing=True).status
        try:
            job = jobs.resume_job(self.session, self.tenant, job_id)
        except jobs.JobConflict:
            assert status in {s.value for s in TERMINAL_STATUSES}
        else:
            assert job.status == {"PAUSED": "QUEUED"}.get(status, status)
            assert not job.pause_requested
        self.session.commit()

    @invariant()
    def one_live_lease_per_job_and_attempts_bounded(self) -> None:
        if not hasattr(self, "session"):
            return
        for job in self.session.scalars(select(Job).execution_options(populate_existing=True)):
            assert job.attempt <= job.max_attempts
            if job.status == "RUNNING":
                assert job.lease_owner is not None and job.lease_expires_at is not None
            else:
                assert job.lease_owner is None and job.lease_expires_at is None
            # Nobody would ever claim or cancel it.
            assert not (job.status == "QUEUED" and job.cancel_requested), job.id
            assert not job.pause_requested or job.status == "RUNNING", job.id
            if job.status in ("QUEUED", "PAUSED"):
                assert job.attempt < job.max_attempts, job.id

    @invariant()
    def transitions_are_allowed_and_terminal_states_final(self) -> None:
        if not hasattr(self, "session"):
            return
        events = self.session.scalars(select(JobEvent).order_by(JobEvent.id)).all()
        last: dict[str, str] = {}
        for event in events:
            if event.from_status is not None:
                assert last.get(event.job_id) == event.from_status, event.job_id
                allowed = ALLOWED[JobStatus(event.from_status)]
                assert JobStatus(event.to_status) in allowed, (event.from_status, event.to_status)
            last[event.job_id] = event.to_status
        for job in self.session.scalars(select(Job)):
            assert last[job.id] == job.status
            if job.id in self.terminal:
                assert job.status == self.terminal[job.id], "a terminal state changed"
            elif job.status in {s.value for s in TERMINAL_STATUSES}:
                self.terminal[job.id] = job.status

    @invariant()
    def every_transition_has_its_one_webhook_delivery(self) -> None:
        if not hasattr(self, "session"):
            return
        news: Counter[tuple[str, str]] = Counter(
            (job_id, STATUS_EVENTS[JobStatus(to)]) for job_id, to
            in self.session.execute(select(JobEvent.job_id, JobEvent.to_status)))
        sent: Counter[tuple[str, str]] = Counter()
        for body in self.session.scalars(select(WebhookDelivery.body)):
            event = json.loads(body)
            sent[(event["data"]["id"].removeprefix("ftjob-"), event["type"])] += 1
        assert sent == news

    @invariant()
    def completed_jobs_have_their_adapter(self) -> None:
        if not hasattr(self, "session"):
            return
        for job in self.session.scalars(select(Job).where(Job.status == "COMPLETED")):
            assert self.storage.exists(adapter_key(job.id))


@pytest.fixture
def state_machine(tmp_path: Path) -> type[JobLifecycle]:
    JobLifecycle._base = tmp_path  # type: ignore[attr-defined]
    return JobLifecycle


def test_job_state_model(state_machine: type[JobLifecycle]) -> None:
    run = settings(
        max_examples=60, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )(state_machine).TestCase
    run().runTest()
