"""The job list's filters and the log cursor on PostgreSQL, where the API tests use SQLite."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared import jobs
from shared.keys import create_api_key
from shared.models import JobStatus
from shared.schema import FinetuneRequest
from shared.tenancy import ALL_TENANTS
from tests.conftest import make_payload


def test_status_and_model_filters_count_and_page_in_sql(pg_session: Session) -> None:
    tenant = create_api_key(pg_session, "pg-tenant").tenant_id
    other = create_api_key(pg_session, "pg-other").tenant_id
    ids = [jobs.create_job(pg_session, owner, FinetuneRequest.model_validate(
        make_payload(model_path=model)), 3, device_class="train").id
        for owner, model in [(tenant, "gpt2"), (tenant, "gpt2"), (tenant, "opt"), (other, "gpt2")]]
    pg_session.commit()
    jobs.request_cancel(pg_session, tenant, ids[1])
    pg_session.commit()

    def listed(scope: str | object, **filters: object) -> tuple[set[str], int]:
        rows, total = jobs.list_jobs(pg_session, scope, 10, 0, **filters)  # type: ignore[arg-type]
        return {row.id for row in rows}, total

    assert listed(tenant, statuses={JobStatus.QUEUED}) == ({ids[0], ids[2]}, 2)
    assert listed(tenant, statuses={JobStatus.QUEUED, JobStatus.CANCELLED},
                  base_model="gpt2") == ({ids[0], ids[1]}, 2)
    assert listed(ALL_TENANTS, base_model="gpt2", statuses=[JobStatus.QUEUED]) == (
        {ids[0], ids[3]}, 2)
    assert listed(tenant, statuses={JobStatus.FAILED}) == (set(), 0)


def test_logs_after_reads_forward_from_any_id(pg_session: Session) -> None:
    tenant = create_api_key(pg_session, "pg-tenant").tenant_id
    job_id = jobs.create_job(pg_session, tenant, FinetuneRequest.model_validate(make_payload()),
                             3, device_class="train").id
    for i in range(4):
        jobs.append_log(pg_session, job_id, 1, f"line {i}")
    pg_session.commit()

    first = jobs.logs_after(pg_session, job_id, 0, 3)
    assert [row.line for row in first] == ["line 0", "line 1", "line 2"]
    assert [row.line for row in jobs.logs_after(pg_session, job_id, first[-1].id, 3)] == [
        "line 3"]
    # The API's upper bound for `after` is one PostgreSQL still compares.
    assert jobs.logs_after(pg_session, job_id, jobs.MAX_LOG_ID, 3) == []
