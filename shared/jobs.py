"""The job state machine and every write to a job row.

Status changes go through `transition()` only: it checks the move against `ALLOWED`, fences on
the attempt number so a stale worker cannot overwrite a newer attempt, and records an event,
and with it the webhook deliveries that report it (`shared.webhooks.outbox`), in the same
transaction.
"""

from __future__ import annotations

import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, Table, case, func, insert, select, update
from sqlalchemy.orm import Session

from shared.models import (
    TERMINAL_STATUSES,
    Job,
    JobEvent,
    JobLog,
    JobMetric,
    JobStatus,
    Tenant,
    new_id,
    utcnow,
)
from shared.payload_secrets import drop_secrets, seal_secrets
from shared.schema import FinetuneRequest
from shared.tenancy import Scope, newest_first, page_after, visible_to
from shared.webhooks.events import CHECKPOINT_SAVED, EVALUATED
from shared.webhooks.outbox import record_job_event, record_status_change

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # QUEUED -> PAUSED: a job nobody runs pauses at once (`request_pause`).
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.PAUSED}
    ),
    # RUNNING -> QUEUED: the lease expired (the worker died) and attempts remain, or the
    # worker handed the job back (`hand_back`). RUNNING -> PAUSED: the worker paused it at a
    # step, or it died with a pause asked.
    JobStatus.RUNNING: frozenset(
        {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED,
         JobStatus.PAUSED}
    ),
    # PAUSED -> QUEUED: resumed (`resume_job`); the next attempt continues from the checkpoint.
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

MAX_LOG_LINE = 4000
# job_logs.id is a 32-bit INTEGER: PostgreSQL refuses a larger number even in a comparison.
MAX_LOG_ID = 2**31 - 1


class JobNotFound(LookupError):
    pass


class JobConflict(Exception):
    """The job is in a state where the requested action makes no sense (e.g. cancel a
    completed job)."""


class IllegalTransition(Exception):
    pass


@dataclass(frozen=True)
class LeaseRenewal:
    """What a heartbeat learns from renewing its lease."""

    held: bool
    """The attempt still runs the job; False: it moved on without it."""
    cancel_requested: bool = False
    pause_requested: bool = False


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    owner: str
    # Whose job: the worker keeps hub downloads made with a tenant's token apart.
    tenant_id: str | None = None


_JOBS: Table = Job.__table__  # type: ignore[assignment]
_EVENTS: Table = JobEvent.__table__  # type: ignore[assignment]
# Built once, values bound at execution: see `create_job`.
_INSERT_JOB = insert(_JOBS)
_INSERT_EVENT = insert(_EVENTS)


@dataclass(frozen=True)
class NewJob:
    """A job just inserted, QUEUED, in a session's open transaction."""

    id: str
    tenant_id: str
    device_class: str


def create_job(
    session: Session, tenant_id: str, request: FinetuneRequest, max_attempts: int,
    *, device_class: str, warnings: Sequence[str] = (), openai: Mapping[str, Any] | None = None,
) -> NewJob:
    """Insert a QUEUED job for `request`, its secrets encrypted, and its first event; the
    caller commits, then sends the wake-up to `device_class`'s queue. `device_class`: the
    class the job was routed to (`shared.device_classes.route`); only that class's workers
    claim it. `warnings` are sentences found at submit time, shown with the job; the worker
    adds its own (`add_warning`). `openai`: what the OpenAI dialect was asked beyond the
    payload (`Job.openai`).

    Two Core INSERTs built once, rather than ORM objects: every submit goes through here,
    and building statements and flushing a unit of work cost several times what PostgreSQL
    spends on the rows. The rows get the same column defaults either way.
    """
    job = NewJob(new_id(), tenant_id, device_class)
    session.execute(_INSERT_JOB, {
        "id": job.id,
        "tenant_id": tenant_id,
        "status": JobStatus.QUEUED.value,
        "payload": seal_secrets(_stored_payload(request)),
        "base_model": request.pretrainedmodel_config.model_path,
        "max_attempts": max_attempts,
        "warnings": [w[:MAX_LOG_LINE] for w in warnings] or None,
        "openai": dict(openai) if openai is not None else None,
        "device_class": device_class,
    })
    session.execute(_INSERT_EVENT, {
        "job_id": job.id, "from_status": None, "to_status": JobStatus.QUEUED.value,
        "attempt": 0,
    })
    record_status_change(session, job.id, JobStatus.QUEUED, 0)
    return job


def _stored_payload(request: FinetuneRequest) -> dict[str, Any]:
    """The request as the job keeps it, defaults filled in, except a prompt_template the
    request left out: it stays out, so that the worker, which reads the payload back through
    the schema, can tell the user it trains on the schema's default template."""
    payload = request.model_dump(mode="json")
    if "prompt_template" not in request.data_config.model_fields_set:
        del payload["data_config"]["prompt_template"]
    return payload


def get_job(session: Session, scope: Scope, job_id: str) -> Job:
    """The job, if `scope` (a tenant id, or ALL_TENANTS for an admin key) may see it; another
    tenant's job is indistinguishable from a missing one."""
    job = session.scalar(select(Job).where(Job.id == job_id, visible_to(scope, Job.tenant_id)))
    if job is None:
        raise JobNotFound(job_id)
    return job


def list_jobs(
    session: Session, scope: Scope, limit: int, offset: int, *,
    statuses: Collection[JobStatus] = (), base_model: str | None = None,
) -> tuple[list[Job], int]:
    """One page of the jobs `scope` sees, newest first, and how many there are in all; with
    `statuses`, only jobs in one of them; with `base_model`, only jobs of that exact model."""
    filters: list[ColumnElement[bool]] = []
    if statuses:
        filters.append(Job.status.in_([status.value for status in statuses]))
    if base_model is not None:
        filters.append(Job.base_model == base_model)
    return newest_first(session, Job, scope, limit, offset, filters)


def jobs_after(
    session: Session, scope: Scope, after_id: str | None, limit: int, *,
    metadata: Mapping[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """A page of the jobs `scope` sees, newest first, after the job `after_id`, and whether
    more follow (`shared.tenancy.page_after`); with `metadata`, only jobs created with every
    one of those pairs (`Job.openai`)."""
    filters = [Job.openai["metadata"][key].as_string() == value
               for key, value in (metadata or {}).items()]
    return page_after(session, Job, scope, after_id=after_id, limit=limit, filters=filters)


def completed_jobs(
    session: Session, scope: Scope, *, id_prefix: str = "", limit: int = 1000
) -> list[Job]:
    """The COMPLETED jobs `scope` sees, oldest first, whose id starts with `id_prefix`: the
    fine-tuned models a tenant can call."""
    where = [visible_to(scope, Job.tenant_id), Job.status == JobStatus.COMPLETED.value]
    if id_prefix:
        where.append(Job.id.startswith(id_prefix, autoescape=True))
    return list(session.scalars(
        select(Job).where(*where).order_by(Job.created_at, Job.id).limit(limit)
    ).all())


def claim_job(session: Session, job_id: str, owner: str, lease_seconds: int) -> Claim | None:
    """Take a QUEUED job for one attempt, or return None if it is not QUEUED (held elsewhere,
    done, cancelled) or has used up its attempts.

    One conditional UPDATE decides, so two workers handed the same message (Redis redelivery,
    a re-sent wake-up) cannot both train: the database, not the broker, says who runs the job.
    A job whose worker died goes back to QUEUED through `requeue_expired_leases`, never straight
    from RUNNING here, so every new attempt is counted and logged in one place. The lease is
    set in the same UPDATE: a worker killed before its first heartbeat still leaves a lease that
    expires.
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.QUEUED.value,
            Job.cancel_requested.is_(False),
            Job.attempt < Job.max_attempts,
        )
        .values(
            status=JobStatus.RUNNING.value,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt=Job.attempt + 1,
            started_at=func.coalesce(Job.started_at, now),
            attempt_started_at=now,
            updated_at=now,
            error=None,
        )
        .returning(Job.attempt, Job.tenant_id)
    )
    claimed = result.one_or_none()
    if claimed is None:
        return None
    attempt, tenant_id = claimed
    session.add(
        JobEvent(job_id=job_id, from_status=JobStatus.QUEUED.value, to_status="RUNNING",
                 attempt=attempt, reason=f"claimed by {owner}")
    )
    record_status_change(session, job_id, JobStatus.RUNNING, attempt)
    return Claim(job_id, attempt, owner, tenant_id)


def claim_next(
    session: Session, owner: str, lease_seconds: int, *, device_class: str, tries: int = 5
) -> Claim | None:
    """Claim the fairest QUEUED job of `device_class`, the class of the claiming worker, if
    any: what every wake-up does, whichever job it names.

    Fair share, within the class: the job of the tenant with the fewest RUNNING jobs of the
    class per unit of its weight (`Tenant.weight`, 1 unless an admin set it) comes first;
    among tenants that tie, the oldest queued job (`fairest_queued_job`). So a tenant with
    ten jobs queued takes the next free worker of a class only while no other tenant has
    fewer jobs running there for its weight. Each class is a pool of its own: jobs running
    on another class's workers take nothing from this one.

    A wake-up is not tied to one job, so a lost message delays nobody as long as as many
    wake-ups as queued jobs are in the broker (see `shared.maintenance`). The claim itself is
    `claim_job`'s conditional UPDATE; a worker that loses the job to another at the same
    moment picks again, and its new pick counts the job the winner now runs.
    """
    for _ in range(tries):
        job_id = session.scalar(fairest_queued_job(device_class))
        if job_id is None:
            return None
        claim = claim_job(session, job_id, owner, lease_seconds)
        if claim is not None:
            return claim
    return None


def fairest_queued_job(device_class: str) -> Select[str]:
    """The id of the claimable QUEUED job of `device_class` a free worker of that class takes
    next, in one query that PostgreSQL and SQLite both run: tenants ordered by running jobs of
    the class / weight (a tenant with nothing running first, whatever its weight); among
    tenants that tie, the one a worker of the class started a job for least recently (never
    first); then jobs by age.

    The second key is what makes one worker fair: each time it comes free, the tenant whose
    job just ended runs nothing, like every other, and by age alone the tenant with the
    older queue would win every time."""
    running = (
        select(Job.tenant_id, func.count().label("jobs"))
        .where(Job.status == JobStatus.RUNNING.value, Job.device_class == device_class)
        .group_by(Job.tenant_id)
        .subquery("running")
    )
    served = (
        select(Job.tenant_id, func.max(Job.attempt_started_at).label("at"))
        .where(Job.attempt_started_at.is_not(None), Job.device_class == device_class)
        .group_by(Job.tenant_id)
        .subquery("served")
    )
    # Float division on both databases: `weight` is a float column.
    load = func.coalesce(running.c.jobs, 0) / Tenant.weight
    return (
        select(Job.id)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .outerjoin(running, running.c.tenant_id == Job.tenant_id)
        .outerjoin(served, served.c.tenant_id == Job.tenant_id)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.device_class == device_class,
            Job.cancel_requested.is_(False),
            Job.attempt < Job.max_attempts,
        )
        .order_by(load, served.c.at.asc().nulls_first(), Job.created_at, Job.id)
        .limit(1)
    )


def renew_lease(session: Session, claim: Claim, lease_seconds: int) -> LeaseRenewal:
    """Extend the lease; say whether the attempt still holds the job and whether the user
    asked to cancel or pause it."""
    now = utcnow()
    held = session.execute(
        update(Job)
        .where(
            Job.id == claim.job_id,
            Job.attempt == claim.attempt,
            Job.status == JobStatus.RUNNING.value,
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        .returning(Job.cancel_requested, Job.pause_requested)
    ).one_or_none()
    if held is None:
        return LeaseRenewal(held=False)
    cancel, pause = held
    return LeaseRenewal(held=True, cancel_requested=bool(cancel), pause_requested=bool(pause))


def worker_identity(pid: int) -> str:
    """The lease owner a worker process writes on the jobs it claims: this host and its pid.
    A supervisor that saw the process `pid` exit names its leases with it
    (`requeue_dead_owner`)."""
    return f"{socket.gethostname()}:{pid}"


def leasing_pids_on_this_host(session: Session) -> list[int]:
    """The pids of the worker processes of this host (lease owners `worker_identity` wrote
    here) that hold RUNNING jobs, sorted."""
    prefix = f"{socket.gethostname()}:"
    owners = session.scalars(
        select(Job.lease_owner).distinct()
        .where(Job.status == JobStatus.RUNNING.value,
               Job.lease_owner.startswith(prefix, autoescape=True))
    )
    return sorted(int(pid) for owner in owners
                  if owner is not None and (pid := owner[len(prefix):]).isdigit())


def requeue_expired_leases(session: Session) -> list[tuple[str, JobStatus]]:
    """Jobs whose worker stopped renewing its lease: back to QUEUED while attempts remain,
    FAILED once they are used up, CANCELLED if a cancel was asked, PAUSED if a pause was (the
    user resumes it; it continues from its last checkpoint). Returns (job id, new status).

    Each move is fenced on the attempt that held the lease, so a worker that renews at the last
    moment, or a second reaper, makes the move a no-op instead of a double re-queue.
    """
    now = utcnow()
    return _settle_lost_attempts(session, Job.lease_expires_at < now, death=None)


def requeue_dead_owner(session: Session, owner: str, death: str) -> list[tuple[str, JobStatus]]:
    """The RUNNING jobs leased by `owner`, a worker process known to be gone (its supervisor
    reaped it): moved at once, as `requeue_expired_leases` moves them once the lease expires,
    and the lost attempt counted alike. `death` says how the worker went ("worker pid 123
    exited by SIGKILL"), for the event's reason. Returns (job id, new status).

    Fenced on the attempt the owner held: a job re-queued and claimed again meanwhile is left
    to its new attempt.
    """
    return _settle_lost_attempts(session, Job.lease_owner == owner, death=death)


def requeue_lost_attempt(session: Session, claim: Claim, why: str) -> list[tuple[str, JobStatus]]:
    """`claim`'s attempt cannot go on for a fault of its worker, which says so itself (it
    could not prepare the attempt): moved on at once, as `requeue_dead_owner` moves a dead
    worker's, the attempt counted. `why` is the event's reason. Fenced on the attempt."""
    return _settle_lost_attempts(
        session, (Job.id == claim.job_id) & (Job.attempt == claim.attempt), death=why)


def _settle_lost_attempts(
    session: Session, lost: ColumnElement[bool], *, death: str | None
) -> list[tuple[str, JobStatus]]:
    """Move each RUNNING job that matches `lost` on from its lost attempt. `death`: how its
    worker went, when known; None when only its lease says so, and then a move happens only
    while the lease is still expired (`transition`)."""
    rows = session.execute(
        select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested,
               Job.pause_requested, Job.lease_owner)
        .where(Job.status == JobStatus.RUNNING.value, lost)
        .order_by(Job.lease_expires_at)
    ).all()
    moved: list[tuple[str, JobStatus]] = []
    for job_id, attempt, max_attempts, cancel, pause, owner in rows:
        if cancel:
            to = JobStatus.CANCELLED
            reason = f"cancelled by the user; {death or 'its worker stopped answering'}"
        elif attempt >= max_attempts:
            # Before a pause: a paused job with no attempt left would be resumed into a queue
            # that never runs it.
            to = JobStatus.FAILED
            last = f"{owner}; {death}" if death else owner
            reason = (f"worker lost in each of the {attempt} attempts allowed (last: {last}); "
                      "the job may be crashing its worker, e.g. out of memory")
        elif pause:
            # The lost attempt counts, as for a re-queue: the worker's death may be the job's.
            to = JobStatus.PAUSED
            how = f" ({death})" if death else ""
            reason = (f"paused by the user; its worker {owner} was lost before it paused{how}, "
                      "so it resumes from its last checkpoint")
        elif death:
            to, reason = JobStatus.QUEUED, f"{death}; attempt {attempt} lost, re-queued"
        else:
            to = JobStatus.QUEUED
            reason = f"lease of attempt {attempt} expired (worker {owner} lost); re-queued"
        if transition(session, job_id, to, attempt=attempt, reason=reason,
                      lease_expired=death is None):
            moved.append((job_id, to))
    return moved


def hand_back(session: Session, claim: Claim, reason: str,
              *, memory_rung: int | None = None) -> JobStatus | None:
    """Give the job of `claim`'s attempt back because its worker stopped it without a fault of
    the job (the worker is shutting down, or it paused the job): QUEUED, lease released, for
    the next worker to resume from its last checkpoint. The attempt is given back too
    (`max_attempts` + 1): a shutdown or a pause is no fault of the job, and a fleet restarted
    a few times must not use up the attempts kept for crashes.

    A job whose cancel was asked ends CANCELLED instead, one whose pause is still asked
    PAUSED (a pause withdrawn by `resume_job` meanwhile leaves it QUEUED). `reason` is the
    event's reason for QUEUED. With `memory_rung` (an attempt out of memory: no fault of the
    job either, while the ladder has a rung left), the next attempt trains on that rung, set
    in the same transaction. Returns the status the job moved to; None when the attempt no
    longer owns it.
    """
    # Locked before reading the cancel and the pause: `request_cancel`, `request_pause` and
    # `resume_job` wait for this transaction and then see the job QUEUED or PAUSED.
    job = session.get(Job, claim.job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise JobNotFound(claim.job_id)
    if job.cancel_requested:
        cancelled = transition(session, claim.job_id, JobStatus.CANCELLED, attempt=claim.attempt,
                               reason="cancelled by the user")
        return JobStatus.CANCELLED if cancelled else None
    to = JobStatus.PAUSED if job.pause_requested else JobStatus.QUEUED
    why = "paused by the user" if to is JobStatus.PAUSED else reason
    if not transition(session, claim.job_id, to, attempt=claim.attempt, reason=why):
        return None
    values: dict[str, Any] = {"max_attempts": Job.max_attempts + 1}
    if memory_rung is not None:
        values["memory_rung"] = memory_rung
    session.execute(update(Job).where(Job.id == claim.job_id).values(**values))
    return to


def set_memory_rung(session: Session, claim: Claim, rung: int) -> bool:
    """Train the job on memory ladder rung `rung` from now on, fenced on the claim's attempt
    like the worker's other writes; False when that attempt no longer owns the job."""
    done = session.execute(
        update(Job)
        .where(Job.id == claim.job_id, Job.attempt == claim.attempt,
               Job.status == JobStatus.RUNNING.value)
        .values(memory_rung=rung, updated_at=utcnow())
    )
    return done.rowcount == 1  # type: ignore[attr-defined]


def fail_past_hard_limit(session: Session, hard_limit_s: int) -> list[str]:
    """Fail RUNNING jobs whose attempt started more than `hard_limit_s` ago: the backstop for
    a worker that neither finishes nor notices its soft limit. Its fenced writes then fail and
    its heartbeat tells it to stop."""
    cutoff = utcnow() - timedelta(seconds=hard_limit_s)
    late = session.execute(
        select(Job.id, Job.attempt)
        .where(Job.status == JobStatus.RUNNING.value, Job.attempt_started_at < cutoff)
    ).all()
    reason = f"timeout: still running after the hard time limit of {hard_limit_s} s"
    return [
        job_id for job_id, attempt in late
        if transition(session, job_id, JobStatus.FAILED, attempt=attempt, reason=reason)
    ]


def _claimable(device_class: str | None) -> list[ColumnElement[bool]]:
    where = [Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False)]
    if device_class is not None:
        where.append(Job.device_class == device_class)
    return where


def queued_job_ids(session: Session, limit: int, *, device_class: str | None = None
                   ) -> list[str]:
    """The oldest claimable QUEUED jobs, oldest first; with `device_class`, of that class
    only."""
    return list(
        session.scalars(
            select(Job.id).where(*_claimable(device_class))
            .order_by(Job.created_at, Job.id)
            .limit(limit)
        ).all()
    )


def count_queued(session: Session, *, device_class: str | None = None) -> int:
    """Claimable QUEUED jobs; with `device_class`, of that class only."""
    return session.scalar(
        select(func.count()).select_from(Job).where(*_claimable(device_class))
    ) or 0


@dataclass(frozen=True)
class UnservedJob:
    id: str
    device_class: str
    warnings: list[str]


def queued_outside(session: Session, device_classes: Collection[str]) -> list[UnservedJob]:
    """The claimable QUEUED jobs routed to a class that is none of `device_classes`, oldest
    first: jobs no worker of this deployment takes."""
    return [UnservedJob(job_id, device_class, list(warnings or []))
            for job_id, device_class, warnings in session.execute(
                select(Job.id, Job.device_class, Job.warnings)
                .where(*_claimable(None), Job.device_class.not_in(list(device_classes)))
                .order_by(Job.created_at, Job.id)
            )]


def warn_queued_job(session: Session, job_id: str, warning: str) -> bool:
    """Add `warning` to a QUEUED job's warnings, and to its log, unless it carries it
    already; False then, or when the job is no longer QUEUED. For what the service finds
    about a job nobody runs; a running attempt's warnings go through `add_warning`."""
    fence = (Job.id == job_id, Job.status == JobStatus.QUEUED.value)
    found = session.execute(
        select(Job.warnings, Job.attempt).where(*fence).with_for_update()
    ).one_or_none()
    warning = warning[:MAX_LOG_LINE]
    if found is None or warning in (found.warnings or []):
        return False
    session.execute(update(Job).where(*fence).values(
        warnings=[*(found.warnings or []), warning], updated_at=utcnow()))
    append_log(session, job_id, found.attempt, warning)
    return True


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    attempt: int | None = None,
    reason: str | None = None,
    result: dict[str, Any] | None = None,
    lease_expired: bool = False,
    error_code: str | None = None,
) -> bool:
    """Move a job to `to` if the move is allowed and (when given) the attempt still owns it:
    the job is RUNNING under that attempt.

    With `lease_expired`, the move happens only while the lease is still expired, so a worker
    whose heartbeat renewed it in the meantime keeps its job. `error_code` goes with the
    `reason` of a FAILED job where the caller has a stable code for it.

    Returns False when the job moved on without us (another attempt, a cancel): the caller's
    view is stale and it must not write more.
    """
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise JobNotFound(job_id)
    current = JobStatus(job.status)
    # An attempt holds the job only while it runs: once the reaper has put it back to QUEUED
    # (same attempt number until the next claim), that attempt's late outcome is stale.
    if attempt is not None and (job.attempt != attempt or current is not JobStatus.RUNNING):
        return False
    if to not in ALLOWED[current]:
        if current in TERMINAL_STATUSES or attempt is not None:
            return False
        raise IllegalTransition(f"{current} -> {to}")
    now = utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now}
    if to in TERMINAL_STATUSES:
        values.update(finished_at=now, lease_owner=None, lease_expires_at=None)
        if to is JobStatus.COMPLETED:
            values.update(progress=1.0, phase=None, error=None)
        else:
            values.update(error=reason, error_code=error_code)
        # A finished job needs its hub token and W&B key no more: they leave the database in
        # the transaction that ends the job.
        dropped = drop_secrets(job.payload)
        if dropped != job.payload:
            values["payload"] = dropped
    if result is not None:
        values["result"] = result
    if to is JobStatus.QUEUED or to is JobStatus.PAUSED:
        values.update(lease_owner=None, lease_expires_at=None, phase=None)
    # A pause is asked of a running job only: whatever it moves to settles it.
    if to is not JobStatus.RUNNING:
        values["pause_requested"] = False
    where = [Job.id == job_id, Job.status == current.value, Job.attempt == job.attempt]
    if lease_expired:
        where.append(Job.lease_expires_at < now)
    # "fetch": the Python-side evaluation of the WHERE would compare SQLite's naive datetimes
    # with an aware one.
    fenced = session.execute(
        update(Job).where(*where).values(**values),
        execution_options={"synchronize_session": "fetch"},
    )
    if fenced.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(
        JobEvent(job_id=job_id, from_status=current.value, to_status=to.value,
                 attempt=job.attempt, reason=reason)
    )
    record_status_change(session, job_id, to, job.attempt)
    return True


def request_cancel(session: Session, scope: Scope, job_id: str) -> Job:
    """Cancel a queued or paused job at once; ask a running one to stop at its next step."""
    job = get_job(session, scope, job_id)
    seen = JobStatus(job.status)
    if seen in TERMINAL_STATUSES:
        raise JobConflict(f"job {job_id} is already {seen.value}; only queued, running or "
                          "paused jobs can be cancelled")
    # The status the UPDATE saw, not the one read above: a worker may have handed the job back
    # or paused it in between (the UPDATE waits for its transaction), and a QUEUED or PAUSED
    # job with a cancel asked would never be claimed nor cancelled.
    status = JobStatus(session.execute(
        update(Job).where(Job.id == job_id).values(cancel_requested=True).returning(Job.status)
    ).scalar_one())
    if status is JobStatus.QUEUED or status is JobStatus.PAUSED:
        reason = ("cancelled before it started" if seen is JobStatus.QUEUED
                  and status is JobStatus.QUEUED else "cancelled by the user")
        transition(session, job_id, JobStatus.CANCELLED, reason=reason)
    session.refresh(job)
    return job


def request_pause(session: Session, scope: Scope, job_id: str) -> Job:
    """Pause a queued job at once; ask a running one to pause at its next step, where its
    worker saves a checkpoint and moves it to PAUSED. A paused job is left as it is.

    Raises `JobConflict` for a finished job, or a running one whose cancel was asked.
    """
    job = get_job(session, scope, job_id)
    _refuse_finished(job, "paused")
    # As in `request_cancel`: the UPDATE waits for a worker's transaction (a claim, a hand
    # back, a pause) and decides on the status that committed, not on the one read above.
    status = session.execute(
        update(Job)
        .where(Job.id == job_id,
               Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
               Job.cancel_requested.is_(False))
        .values(pause_requested=True)
        .returning(Job.status)
    ).scalar_one_or_none()
    if status == JobStatus.QUEUED.value:
        reason = ("paused before it started" if job.attempt == 0
                  else "paused by the user while queued")
        transition(session, job_id, JobStatus.PAUSED, reason=reason)
    session.refresh(job)
    if status is None:
        # Moved on meanwhile: paused already (nothing to do), finished, or being cancelled.
        _refuse_finished(job, "paused")
        if job.cancel_requested and job.status == JobStatus.RUNNING.value:
            raise JobConflict(f"job {job_id} is being cancelled; a cancelled job cannot be "
                              "paused")
    return job


def resume_job(session: Session, scope: Scope, job_id: str) -> Job:
    """Queue a paused job again, its next attempt to continue from the checkpoint of the step
    it paused at; withdraw the pause a running job has not reached yet. A queued or running
    job is left as it is. The caller commits, then sends the wake-up
    (`shared.queue.enqueue_training`) if the job is QUEUED.

    Raises `JobConflict` for a finished job.
    """
    job = get_job(session, scope, job_id)
    _refuse_finished(job, "resumed")
    # Locked: the worker's `hand_back` reads the pause under the same lock, so it either
    # pauses the job before this (which then queues it) or finds the pause withdrawn.
    session.refresh(job, with_for_update=True)
    _refuse_finished(job, "resumed")
    if job.status == JobStatus.PAUSED.value:
        transition(session, job_id, JobStatus.QUEUED, reason="resumed by the user")
        session.refresh(job)
    elif job.status == JobStatus.RUNNING.value and job.pause_requested:
        session.execute(update(Job).where(Job.id == job_id).values(pause_requested=False))
        session.refresh(job)
    return job


def _refuse_finished(job: Job, action: str) -> None:
    status = JobStatus(job.status)
    if status in TERMINAL_STATUSES:
        raise JobConflict(f"job {job.id} is already {status.value}; a finished job cannot "
                          f"be {action}")


def set_phase(session: Session, claim: Claim, phase: str | None = None,
              progress: float | None = None) -> bool:
    values: dict[str, Any] = {"updated_at": utcnow()}
    if phase is not None:
        values["phase"] = phase
    if progress is not None:
        # Never backwards within a job: a re-queued job resumes from its last checkpoint, and
        # the steps its next attempt trains again were already counted.
        fraction = max(0.0, min(1.0, progress))
        values["progress"] = case((Job.progress > fraction, Job.progress), else_=fraction)
    done = session.execute(
        update(Job)
        .where(Job.id == claim.job_id, Job.attempt == claim.attempt,
               Job.status == JobStatus.RUNNING.value)
        .values(**values)
    )
    return done.rowcount == 1  # type: ignore[attr-defined]


def add_warning(session: Session, claim: Claim, warning: str) -> bool:
    """Add `warning` to the job's warnings, fenced on the claim's attempt like the worker's
    other writes; False when that attempt no longer owns the job. A sentence the job already
    carries is not added again: a retried or resumed attempt says the same things."""
    fence = (Job.id == claim.job_id, Job.attempt == claim.attempt,
             Job.status == JobStatus.RUNNING.value)
    found = session.execute(select(Job.warnings).where(*fence).with_for_update()).one_or_none()
    if found is None:
        return False
    warning = warning[:MAX_LOG_LINE]
    warnings = list(found.warnings or [])
    if warning in warnings:
        return True
    done = session.execute(
        update(Job).where(*fence).values(warnings=[*warnings, warning], updated_at=utcnow())
    )
    return done.rowcount == 1  # type: ignore[attr-defined]


def append_log(session: Session, job_id: str, attempt: int, line: str) -> None:
    session.add(JobLog(job_id=job_id, attempt=attempt, line=line[:MAX_LOG_LINE]))


def record_metric(session: Session, job_id: str, attempt: int, step: int,
                  values: dict[str, float]) -> None:
    """A metrics row; one with an `eval_loss` (an evaluation) is news for webhooks too."""
    session.add(JobMetric(job_id=job_id, attempt=attempt, step=step, values=values))
    if "eval_loss" in values:
        record_job_event(session, job_id, EVALUATED, attempt=attempt, step=step,
                         eval_loss=values["eval_loss"])


def record_checkpoint(session: Session, job_id: str, attempt: int, step: int,
                      line: str) -> None:
    """A checkpoint of `step` is in storage: the log line that says so, and the news of it
    for webhooks, in one transaction."""
    append_log(session, job_id, attempt, line)
    record_job_event(session, job_id, CHECKPOINT_SAVED, attempt=attempt, step=step)


def tail_logs(session: Session, job_id: str, n_lines: int) -> list[JobLog]:
    """The job's last `n_lines` log lines, oldest first."""
    rows = session.scalars(
        select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.id.desc()).limit(n_lines)
    ).all()
    return list(reversed(rows))


_FeedRow = TypeVar("_FeedRow", JobLog, JobEvent, JobMetric)


def _rows_after(session: Session, table: type[_FeedRow], job_id: str, after_id: int,
                limit: int) -> list[_FeedRow]:
    return list(session.scalars(
        select(table).where(table.job_id == job_id, table.id > after_id)
        .order_by(table.id).limit(limit)
    ).all())


def logs_after(session: Session, job_id: str, after_id: int, n_lines: int) -> list[JobLog]:
    """Up to `n_lines` of the job's log lines with an id above `after_id`, oldest first: pass
    the last id seen to follow a running job without reading a line twice.

    Ids grow in the order lines are committed as long as one writer logs for the job at a
    time, as an attempt's worker does, one transaction after another.
    """
    return _rows_after(session, JobLog, job_id, after_id, n_lines)


def events_after(session: Session, job_id: str, after_id: int, limit: int) -> list[JobEvent]:
    """Up to `limit` of the job's status changes with an id above `after_id`, oldest first.

    Ids grow in commit order: every transition of a job locks its row before it inserts the
    event, so two transactions never hand out a job's event ids in one order and commit them
    in the other."""
    return _rows_after(session, JobEvent, job_id, after_id, limit)


def metrics_after(session: Session, job_id: str, after_id: int, limit: int) -> list[JobMetric]:
    """Up to `limit` of the job's metrics rows with an id above `after_id`, oldest first; one
    writer at a time, as for `logs_after`."""
    return _rows_after(session, JobMetric, job_id, after_id, limit)


def latest_metric(session: Session, job_id: str, name: str) -> JobMetric | None:
    """The job's last metrics row, if it has the value `name` (the training rows carry the
    ETA, evaluation rows do not)."""
    row = session.scalar(select(JobMetric).where(JobMetric.job_id == job_id)
                         .order_by(JobMetric.id.desc()).limit(1))
    return row if row is not None and name in row.values else None


def list_metrics(session: Session, job_id: str) -> list[JobMetric]:
    return list(
        session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.id)
        ).all()
    )
