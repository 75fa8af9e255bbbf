"""What PostgreSQL does for the queries behind submit, status and list, on a database where
one tenant is among many and other tenants have a backlog of queued jobs: each reads through
an index only what the caller's tenant needs. Checked with EXPLAIN, never with timings."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, insert
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import make_engine
from shared.migrate import upgrade_database
from shared.models import Job, JobStatus, Tenant, utcnow
from shared.tenancy import newest_first
from tests.conftest import make_payload

OWN_JOBS, OWN_ACTIVE = 500, 5
OTHER_TENANTS, OTHER_JOBS, OTHER_QUEUED = 19, 9500, 1000


def _job(tenant_id: str, status: JobStatus, age_s: int) -> dict[str, Any]:
    created = utcnow() - timedelta(seconds=age_s)
    return {"id": str(uuid.uuid4()), "tenant_id": tenant_id, "status": status.value,
            "progress": 0.0, "payload": make_payload(), "base_model": "m", "attempt": 0,
            "max_attempts": 3, "cancel_requested": False, "created_at": created,
            "updated_at": created}


@dataclass(frozen=True)
class History:
    engine: Engine
    tenant_id: str
    """Our tenant's."""


@pytest.fixture
def history(postgres_url: str) -> Iterator[History]:
    """10,000 jobs: ours (500, 5 of them active) among 19 other tenants' (1,000 queued)."""
    upgrade_database(postgres_url)
    engine = make_engine(postgres_url)
    with Session(engine) as session:
        tenants = [Tenant(name=f"t{i}") for i in range(1 + OTHER_TENANTS)]
        session.add_all(tenants)
        session.flush()
        own = tenants[0].id
        rows = [_job(own, JobStatus.QUEUED if i < OWN_ACTIVE else JobStatus.COMPLETED,
                     i * 60) for i in range(OWN_JOBS)]
        rows += [_job(tenants[1 + i % OTHER_TENANTS].id,
                      JobStatus.QUEUED if i < OTHER_QUEUED else JobStatus.COMPLETED, i * 7)
                 for i in range(OTHER_JOBS)]
        session.execute(insert(Job), rows)
        session.commit()
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
    yield History(engine, own)
    engine.dispose()


def plans(engine: Engine, run: Callable[[Session], object]) -> list[dict[str, Any]]:
    """The plan of every statement `run(session)` sends, as PostgreSQL chooses it."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        sent.append((sql, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            run(session)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    with engine.connect() as conn:
        return [conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", params).scalar_one()[0]
                ["Plan"] for sql, params in sent]


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def indexes_used(plan: dict[str, Any]) -> set[str]:
    return {node["Index Name"] for node in nodes(plan) if "Index Name" in node}


def scans_of_jobs(plan: dict[str, Any]) -> list[str]:
    return [node["Node Type"] for node in nodes(plan) if node.get("Relation Name") == "jobs"]


def test_the_active_jobs_count_reads_only_the_tenants_own_active_jobs(history: History) -> None:
    from api.limits.active_jobs import active_jobs

    [count] = plans(history.engine,
                    lambda s: active_jobs(s, history.tenant_id, besides=str(uuid.uuid4())))
    # Not ix_jobs_status_lease (every tenant's 1,005 active jobs), nor ix_jobs_tenant_created
    # (all 500 of the tenant's jobs): the 5 that count.
    assert indexes_used(count) == {"ix_jobs_tenant_status"}, count


def test_a_status_read_is_one_primary_key_lookup(history: History) -> None:
    def read(session: Session) -> None:
        with pytest.raises(jobs.JobNotFound):
            jobs.get_job(session, history.tenant_id, str(uuid.uuid4()))

    [lookup] = plans(history.engine, read)
    assert indexes_used(lookup) == {"jobs_pkey"}, lookup


def test_a_list_page_reads_the_tenants_newest_jobs_through_an_index(history: History) -> None:
    total, page = plans(history.engine,
                        lambda s: newest_first(s, Job, history.tenant_id, 20, 0))
    assert "Seq Scan" not in scans_of_jobs(total), total
    # Newest first straight from the index: no sort of the tenant's 500 jobs to find 20.
    assert indexes_used(page) == {"ix_jobs_tenant_created"}, page
    assert not any(node["Node Type"] == "Sort" for node in nodes(page)), page
