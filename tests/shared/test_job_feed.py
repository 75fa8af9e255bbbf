"""A job's feed (`shared.job_feed`): its status changes, log lines and metrics read page by page
after a cursor, each row once, merged by time; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from shared import jobs
from shared.job_feed import FeedCursor, FeedRow, MalformedCursor, read_feed, source_of
from shared.keys import create_api_key
from shared.models import JobEvent, JobLog, JobMetric, JobStatus
from shared.schema import FinetuneRequest
from tests.conftest import make_payload

T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def tenant(session: Session) -> str:
    tenant_id = create_api_key(session, "reader").tenant_id
    session.commit()
    return tenant_id


@pytest.fixture
def job_id(session: Session, tenant: str) -> str:
    request = FinetuneRequest.model_validate(make_payload())
    job_id = jobs.create_job(session, tenant, request, 3, device_class="train").id
    session.commit()
    return job_id


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def add(session: Session, *rows: FeedRow) -> None:
    session.add_all(rows)
    session.commit()


def read_all(session: Session, tenant: str, job_id: str, limit: int,
             cursor: FeedCursor | None = None) -> tuple[list[FeedRow], FeedCursor, int]:
    """Every row after `cursor`, page by page; the rows, the last cursor, the pages read."""
    rows: list[FeedRow] = []
    cursor = cursor or FeedCursor()
    for pages in range(1, 100):
        page = read_feed(session, tenant, job_id, cursor, limit=limit)
        rows += page.rows
        cursor = page.cursor
        if page.drained:
            return rows, cursor, pages
    raise AssertionError("the feed never drained")


def keys(rows: list[FeedRow]) -> list[tuple[str, int]]:
    return [(source_of(row), row.id) for row in rows]


def test_a_cursor_reads_back_from_its_text() -> None:
    cursor = FeedCursor(status=12, log=340, metric=56)
    assert str(cursor) == "s12.l340.m56"
    assert FeedCursor.parse(str(cursor)) == cursor
    assert FeedCursor.parse("s0.l0.m0") == FeedCursor()


@pytest.mark.parametrize("text", [
    "", "s1.l2", "s1.l2.m3.x", "l1.s2.m3", "s-1.l0.m0", "s1,l2,m3", "s 1.l2.m3",
    "s1.l2.m99999999999", f"s{2**31}.l0.m0", "ftevent-l12-0",
])
def test_a_cursor_this_server_did_not_hand_out_is_refused(text: str) -> None:
    with pytest.raises(MalformedCursor):
        FeedCursor.parse(text)


def test_pages_give_every_row_once_in_time_order_across_the_three_tables(
        session: Session, tenant: str, job_id: str) -> None:
    created = session.query(JobEvent).filter_by(job_id=job_id).one()
    add(session,
        *(JobLog(job_id=job_id, attempt=1, line=f"line {i}", at=at(i)) for i in range(7)),
        *(JobMetric(job_id=job_id, attempt=1, step=i, values={"loss": 1.0 / (i + 1)},
                    at=at(i + 0.5)) for i in range(5)),
        JobEvent(job_id=job_id, from_status="QUEUED", to_status="RUNNING", attempt=1,
                 at=at(0.2)))
    everything, _, _ = read_all(session, tenant, job_id, limit=1000)
    for limit in (1, 2, 3):
        rows, cursor, pages = read_all(session, tenant, job_id, limit=limit)
        assert keys(rows) == keys(everything), limit
        assert pages > 1
    assert len(everything) == 1 + 7 + 5 + 1
    assert everything[0].id == created.id
    instants = [row.at.replace(tzinfo=UTC) if row.at.tzinfo is None else row.at
                for row in everything[1:]]
    assert instants == sorted(instants)
    assert cursor == FeedCursor(
        status=max(r.id for r in everything if isinstance(r, JobEvent)),
        log=max(r.id for r in everything if isinstance(r, JobLog)),
        metric=max(r.id for r in everything if isinstance(r, JobMetric)))


def test_a_cursor_from_the_middle_resumes_with_the_next_row(
        session: Session, tenant: str, job_id: str) -> None:
    add(session, *(JobLog(job_id=job_id, attempt=1, line=f"{i}", at=at(i)) for i in range(4)),
        *(JobMetric(job_id=job_id, attempt=1, step=i, values={}, at=at(i + 0.5))
          for i in range(4)))
    everything, _, _ = read_all(session, tenant, job_id, limit=1000)
    cursor = FeedCursor()
    for row in everything[:5]:
        cursor = cursor.after(row)
    rest, _, _ = read_all(session, tenant, job_id, limit=2, cursor=FeedCursor.parse(str(cursor)))
    assert keys(rest) == keys(everything[5:])


def test_rows_of_one_instant_read_metrics_then_logs_then_the_status_change(
        session: Session, tenant: str, job_id: str) -> None:
    add(session,
        JobEvent(job_id=job_id, from_status="QUEUED", to_status="RUNNING", attempt=1, at=at(1)),
        JobLog(job_id=job_id, attempt=1, line="step 1", at=at(1)),
        JobMetric(job_id=job_id, attempt=1, step=1, values={"loss": 2.0}, at=at(1)))
    rows, _, _ = read_all(session, tenant, job_id, limit=10)
    assert [source_of(row) for row in rows] == ["s", "m", "l", "s"]


def test_rows_written_out_of_time_order_are_still_each_read_once(
        session: Session, tenant: str, job_id: str) -> None:
    # Two writers whose clocks disagree: ids and times in opposite orders. The cursor keeps to
    # ids, so time can only reorder within a page, never skip a row.
    add(session, *(JobLog(job_id=job_id, attempt=1, line=f"{i}", at=at(10 - i))
                   for i in range(6)),
        *(JobMetric(job_id=job_id, attempt=1, step=i, values={}, at=at(i)) for i in range(6)))
    everything, _, _ = read_all(session, tenant, job_id, limit=1000)
    for limit in (1, 2, 4):
        rows, _, _ = read_all(session, tenant, job_id, limit=limit)
        assert sorted(keys(rows)) == sorted(keys(everything))
        assert len(set(keys(rows))) == len(rows) == 1 + 6 + 6
        logs = [row.id for row in rows if isinstance(row, JobLog)]
        assert logs == sorted(logs)


def test_the_feed_ends_once_the_job_is_finished_and_every_row_read(
        session: Session, tenant: str, job_id: str) -> None:
    claim = jobs.claim_job(session, job_id, "w", 60)
    assert claim is not None
    for i in range(3):
        jobs.append_log(session, job_id, claim.attempt, f"line {i}")
    session.commit()
    assert not read_feed(session, tenant, job_id, FeedCursor()).ended
    jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)
    session.commit()
    first = read_feed(session, tenant, job_id, FeedCursor(), limit=2)
    assert not first.ended  # rows remain
    rows, cursor, _ = read_all(session, tenant, job_id, limit=2)
    last = read_feed(session, tenant, job_id, cursor, limit=2)
    assert last.ended and last.rows == []
    assert [row.to_status for row in rows if isinstance(row, JobEvent)] == [
        "QUEUED", "RUNNING", "COMPLETED"]


def test_another_tenants_job_has_no_feed(session: Session, job_id: str) -> None:
    other = create_api_key(session, "other").tenant_id
    session.commit()
    with pytest.raises(jobs.JobNotFound):
        read_feed(session, other, job_id, FeedCursor())
