"""The cap on a tenant's active (QUEUED, RUNNING or PAUSED) jobs, checked at submit."""

from __future__ import annotations

from functools import cache
from typing import Any, cast

from sqlalchemy import Dialect, Table, bindparam, func, literal, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from api.errors import ApiError
from shared.jobs import NewJob
from shared.models import Job, JobStatus, Tenant

# A paused job keeps its place: a resume queues it again without a check, so pausing jobs
# must not make room for more.
ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.PAUSED.value)
# Jobs take minutes to hours; asking again sooner only spends the client's rate limit.
RETRY_AFTER_S = 60

# Both statements run on every submit, so they are Core statements built once, with their
# values bound at execution: building a statement and going through the ORM cost several
# times what PostgreSQL spends running it.
_TENANTS: Table = Tenant.__table__  # type: ignore[assignment]
_JOBS: Table = Job.__table__  # type: ignore[assignment]
_LOCK_TENANT = (update(_TENANTS).where(_TENANTS.c.id == bindparam("tenant_id"))
                .values(name=_TENANTS.c.name))
_COUNT_ACTIVE = (
    select(func.count()).select_from(_JOBS)
    # Literals, not plain strings: a list of strings becomes an "expanding" parameter that
    # SQLAlchemy renders anew on every execution.
    .where(_JOBS.c.tenant_id == bindparam("tenant_id"),
           _JOBS.c.status.in_([literal(status) for status in ACTIVE]),
           _JOBS.c.id != bindparam("besides"))
)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialize submits of one tenant until the session's transaction ends.

    A no-op UPDATE of the tenant's row: on PostgreSQL it takes that row's lock, so a second
    submit of the tenant waits here and then counts the first one's committed job (READ
    COMMITTED reads a fresh snapshot per statement); on SQLite the transaction already holds
    the database write lock from inserting its job, so no other writer can slip in between.
    """
    session.execute(_LOCK_TENANT, {"tenant_id": tenant_id})


def active_jobs(session: Session, tenant_id: str, besides: str) -> int:
    """The tenant's QUEUED, RUNNING and PAUSED jobs, leaving out the job `besides`."""
    return session.execute(_COUNT_ACTIVE, {"tenant_id": tenant_id, "besides": besides}
                           ).scalar_one()


def lock_and_count(session: Session, tenant_id: str, besides: str) -> int:
    """`lock_tenant`, then `active_jobs`: the tenant's active jobs other than `besides`,
    counted once the tenant is locked.

    On PostgreSQL both statements go to the server in one round trip (psycopg's pipeline
    mode, libpq 14 and later): the tenant is held for one round trip fewer, and under load
    that round trip (the API thread waiting for a core, or for the GIL, between the two
    statements) is much of what the tenant's other submits queue behind: with 16 clients
    submitting for one tenant (bench/api_load.py), 2.3 submits waited for the lock on
    average, 1.5 with the pipeline. Two statements all the same: one, say an UPDATE ...
    RETURNING the count, would count in a snapshot taken before it waited for the lock and
    miss the job of the submit it waited for (tests/integration/test_rate_limit_postgres.py
    fails with one).
    """
    bind = session.get_bind()
    if bind.dialect.name != "postgresql" or not _pipeline_supported():
        lock_tenant(session, tenant_id)
        return active_jobs(session, tenant_id, besides)
    import psycopg

    (lock_sql, lock_params), (count_sql, count_params) = _driver_sql(bind.dialect)
    values = {"tenant_id": tenant_id, "besides": besides}
    sa_connection = session.connection()
    connection: Any = sa_connection.connection.driver_connection
    try:
        with connection.cursor() as lock, connection.cursor() as count:
            with connection.pipeline():
                lock.execute(lock_sql, {**lock_params, **values})
                count.execute(count_sql, {**count_params, **values})
            row = count.fetchone()
    except psycopg.Error as error:
        # As SQLAlchemy treats its own statements' errors: a lost connection leaves the pool,
        # and the error is SQLAlchemy's (an OperationalError answers 503, as anywhere else).
        lost = bind.dialect.is_disconnect(cast(Any, error), connection, None)
        if lost:
            sa_connection.invalidate(error)
        raise DBAPIError.instance(lock_sql, values, error, psycopg.Error,
                                  connection_invalidated=lost, dialect=bind.dialect) from error
    return int(row[0])


@cache
def _pipeline_supported() -> bool:
    import psycopg

    return psycopg.Pipeline.is_supported()


@cache
def _driver_sql(dialect: Dialect) -> list[tuple[str, dict[str, Any]]]:
    """The lock and the count as the driver receives them from SQLAlchemy: SQL and the
    parameters compiled into it (the count's statuses)."""
    compiled = [statement.compile(dialect=dialect) for statement in (_LOCK_TENANT, _COUNT_ACTIVE)]
    return [(str(c), dict(c.params)) for c in compiled]


def check_active_jobs(session: Session, new_job: NewJob, max_active: int) -> None:
    """429 with Retry-After when `new_job`'s tenant already had `max_active` other active jobs
    (0: no cap); the session is then rolled back, `new_job` with it.

    Call it last before the commit, with `new_job` inserted in the same transaction: the
    tenant stays locked from here until that commit, so concurrent submits of one tenant take
    turns only for the count and the commit, and each count sees every job committed before
    it. Locking before the inserts would make them wait for each other's inserts too.
    """
    if max_active <= 0:
        return
    count = lock_and_count(session, new_job.tenant_id, besides=new_job.id)
    if count >= max_active:
        session.rollback()  # releases the lock at once
        raise ApiError(429, "too_many_active_jobs",
                       f"this tenant already has {count} queued, running or paused jobs, the "
                       f"most this server allows (TUNERY_MAX_ACTIVE_JOBS_PER_TENANT="
                       f"{max_active}); wait for one to finish or cancel one",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
