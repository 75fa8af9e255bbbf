"""Which queued job a free worker claims (`jobs.claim_next`): the job of the tenant with the
fewest running jobs per unit of weight; among tenants that tie, the one served least
recently, then the oldest job. On SQLite
and PostgreSQL, with jobs submitted and claimed through the state machine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared import jobs
from shared.keys import create_api_key
from shared.models import Job, JobStatus, Tenant
from shared.schema import FinetuneRequest
from shared.tenant_weights import set_weight
from tests.conftest import make_payload

REQUEST = FinetuneRequest.model_validate(make_payload())
T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Queue:
    """Tenants submitting jobs at given minutes, and workers claiming them."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.names: dict[str, str] = {}

    def tenant(self, name: str, weight: float | None = None) -> str:
        tenant_id = create_api_key(self.session, name).tenant_id
        if weight is not None:
            set_weight(self.session, tenant_id, weight)
        self.session.commit()
        self.names[tenant_id] = name
        return tenant_id

    def submit(self, tenant_id: str, minute: int, device_class: str = "train") -> str:
        """A job of `tenant_id` queued at minute `minute`: the minute is its age in the queue."""
        job_id = jobs.create_job(self.session, tenant_id, REQUEST, max_attempts=3,
                                 device_class=device_class).id
        self.session.execute(update(Job).where(Job.id == job_id)
                             .values(created_at=T0 + timedelta(minutes=minute)))
        self.session.commit()
        return job_id

    def running(self, tenant_id: str, count: int, device_class: str = "train") -> list[str]:
        """`count` jobs of the tenant claimed and running (submitted long before the rest)."""
        started = []
        for _ in range(count):
            job_id = self.submit(tenant_id, minute=-1000, device_class=device_class)
            assert jobs.claim_job(self.session, job_id, "earlier-worker", 60) is not None
            self.session.commit()
            started.append(job_id)
        return started

    def claim(self, owner: str = "w", device_class: str = "train") -> str | None:
        claim = jobs.claim_next(self.session, owner, 60, device_class=device_class)
        self.session.commit()
        return None if claim is None else claim.job_id

    def claims(self, n: int) -> list[str | None]:
        return [self.claim(f"w{i}") for i in range(n)]


def test_a_tenant_with_nothing_running_goes_before_an_older_job_of_a_busy_tenant(
        session: Session) -> None:
    queue = Queue(session)
    a, b = queue.tenant("a"), queue.tenant("b")
    queue.running(a, 1)
    older_a = queue.submit(a, minute=0)
    newer_b = queue.submit(b, minute=5)
    assert queue.claims(2) == [newer_b, older_a]


def test_ten_jobs_of_one_tenant_do_not_hold_back_another_tenants_one(session: Session) -> None:
    queue = Queue(session)
    a, b = queue.tenant("a"), queue.tenant("b")
    a_jobs = [queue.submit(a, minute=i) for i in range(10)]
    b_job = queue.submit(b, minute=10)
    # Nothing runs: A's first job is the oldest. Then A runs one and B none: B's job. Then
    # A's, in the order they were queued.
    assert queue.claims(12) == [a_jobs[0], b_job, *a_jobs[1:], None]


def test_tenants_that_tie_are_served_least_recently_served_first(session: Session) -> None:
    queue = Queue(session)
    a, b, c = queue.tenant("a"), queue.tenant("b"), queue.tenant("c")
    for tenant_id in (a, b, c):
        queue.running(tenant_id, 2)  # A's started first, C's last
    b_job, c_job, a_job = (queue.submit(b, minute=1), queue.submit(c, minute=2),
                           queue.submit(a, minute=3))
    # All run 2: A was served longest ago, although its job is the youngest; then B and C
    # run 2 and A 3: B, served before C.
    assert queue.claims(3) == [a_job, b_job, c_job]


def test_tenants_never_served_that_tie_are_served_oldest_job_first(session: Session) -> None:
    queue = Queue(session)
    a, b = queue.tenant("a"), queue.tenant("b")
    b_job, a_job = queue.submit(b, minute=1), queue.submit(a, minute=2)
    assert queue.claims(2) == [b_job, a_job]


def test_one_worker_alternates_between_tenants_instead_of_emptying_the_older_queue(
    session: Session,
) -> None:
    """What one worker (`tunery up`) sees: each time it comes free, the tenant whose job just
    ended runs nothing, like the others; the tenant served least recently goes first."""
    queue = Queue(session)
    a, b = queue.tenant("a"), queue.tenant("b")
    a_jobs = [queue.submit(a, minute=i) for i in range(6)]
    first = queue.claim()
    assert first == a_jobs[0]
    b_job = queue.submit(b, minute=10)  # B arrives while A's first job runs
    order = [first]
    for _ in range(6):
        assert jobs.transition(session, order[-1], JobStatus.COMPLETED, attempt=1)
        session.commit()
        claimed = queue.claim()
        assert claimed is not None
        order.append(claimed)
    assert order == [a_jobs[0], b_job, *a_jobs[1:]]


def test_a_weight_lets_a_tenant_run_that_many_times_the_jobs(session: Session) -> None:
    queue = Queue(session)
    heavy, light = queue.tenant("heavy", weight=2), queue.tenant("light")
    heavy_jobs = [queue.submit(heavy, minute=10 + i) for i in range(5)]
    light_jobs = [queue.submit(light, minute=i) for i in range(5)]
    # running/weight per claim (heavy, light) and the pick:
    #   0/2 = 0/1, light's job is older -> light; 0/2 < 1/1 -> heavy; 1/2 < 1/1 -> heavy;
    #   2/2 = 1/1, light older -> light; 2/2 < 2/1 -> heavy; 3/2 < 2/1 -> heavy;
    #   4/2 = 2/1, light older -> light.
    assert queue.claims(7) == [light_jobs[0], heavy_jobs[0], heavy_jobs[1], light_jobs[1],
                               heavy_jobs[2], heavy_jobs[3], light_jobs[2]]


def test_a_fractional_weight_shrinks_the_share(session: Session) -> None:
    queue = Queue(session)
    small, normal = queue.tenant("small", weight=0.5), queue.tenant("normal")
    queue.running(small, 1)
    queue.running(normal, 1)
    normal_job = queue.submit(normal, minute=5)
    small_job = queue.submit(small, minute=0)
    # small: 1 / 0.5 = 2 > normal: 1 / 1, although small's job is older.
    assert queue.claims(2) == [normal_job, small_job]


def test_a_weight_does_not_rank_tenants_with_nothing_running(session: Session) -> None:
    queue = Queue(session)
    heavy, light = queue.tenant("heavy", weight=100), queue.tenant("light")
    light_job = queue.submit(light, minute=0)
    heavy_job = queue.submit(heavy, minute=1)
    assert queue.claims(2) == [light_job, heavy_job]


def test_only_running_jobs_count_against_a_tenant(session: Session) -> None:
    """Paused, finished and queued jobs take no worker: they leave the tenant's share alone."""
    queue = Queue(session)
    a, b = queue.tenant("a"), queue.tenant("b")
    done, paused = queue.running(a, 2)
    assert jobs.transition(session, done, JobStatus.COMPLETED, attempt=1)
    session.commit()
    jobs.request_pause(session, a, paused)
    session.commit()
    assert jobs.hand_back(session, jobs.Claim(paused, 1, "earlier-worker"), "paused") \
        is JobStatus.PAUSED
    session.commit()
    queue.running(b, 1)
    a_job, b_job = queue.submit(a, minute=5), queue.submit(b, minute=0)
    assert queue.claims(2) == [a_job, b_job]


def test_the_fairest_tenants_unclaimable_jobs_are_passed_over(session: Session) -> None:
    """A cancel asked, or attempts used up, keeps a job from every claim; the fair pick is
    among the jobs a worker may take."""
    queue = Queue(session)
    a, b = queue.tenant("a"), queue.tenant("b")
    queue.running(b, 3)
    cancelling, spent = queue.submit(a, minute=0), queue.submit(a, minute=1)
    session.execute(update(Job).where(Job.id == cancelling).values(cancel_requested=True))
    session.execute(update(Job).where(Job.id == spent).values(attempt=Job.max_attempts))
    session.commit()
    b_job = queue.submit(b, minute=2)
    assert queue.claims(2) == [b_job, None]


def test_tenants_keep_the_default_weight_of_one(session: Session) -> None:
    queue = Queue(session)
    tenant_id = queue.tenant("a")
    assert session.get_one(Tenant, tenant_id).weight == 1.0


def test_a_worker_claims_only_jobs_of_its_device_class(session: Session) -> None:
    queue = Queue(session)
    a = queue.tenant("a")
    pair_job = queue.submit(a, minute=0, device_class="pair")
    small_job = queue.submit(a, minute=1, device_class="small")

    assert queue.claim(device_class="small") == small_job  # the older pair job is not its
    assert queue.claim(device_class="small") is None
    assert queue.claim(device_class="gone") is None
    assert queue.claim(device_class="pair") == pair_job


def test_fair_share_counts_the_jobs_running_in_the_class_only(session: Session) -> None:
    """Each class is a pool of its own: A's three jobs on the pair workers take nothing from
    A's turn on the small ones."""
    queue = Queue(session)
    a, b = queue.tenant("a"), queue.tenant("b")
    queue.running(a, 3, device_class="pair")
    queue.running(b, 1, device_class="small")
    a_job = queue.submit(a, minute=5, device_class="small")
    b_job = queue.submit(b, minute=0, device_class="small")
    # In the small class A runs 0 and B 1: A first, although B's job is older.
    assert [queue.claim(device_class="small") for _ in range(2)] == [a_job, b_job]
