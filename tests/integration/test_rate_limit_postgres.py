"""The active-jobs cap on PostgreSQL: concurrent submits of one tenant, from real threads
through the real app, cannot pass it."""

from __future__ import annotations

from typing import Any

import pytest

from shared.db import reset_engines
from tests.api.test_limits import (  # noqa: F401 - make_client is a fixture
    active_job_count,
    make_client,
    submit_concurrently,
)
from tests.conftest import make_payload


def test_twenty_concurrent_submits_on_postgres_never_pass_the_cap(
    make_client: Any, postgres_url: str  # noqa: F811
) -> None:
    reset_engines()
    client = make_client(database_url=postgres_url, max_active_jobs_per_tenant=10)
    statuses = submit_concurrently(client, 20)
    assert sorted(statuses) == [201] * 10 + [429] * 10
    assert active_job_count() == 10


def test_a_database_failure_in_the_lock_and_count_answers_503_like_any_other(
    make_client: Any, postgres_url: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    # The two statements go to the driver in one pipeline, past SQLAlchemy: its errors must
    # still reach the API as SQLAlchemy's, and a lost connection must leave the pool.
    import psycopg

    reset_engines()
    client = make_client(database_url=postgres_url, max_active_jobs_per_tenant=10)
    execute = psycopg.Cursor.execute

    def connection_lost_at_the_lock(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if str(query).startswith("UPDATE tenants"):
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return execute(self, query, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", connection_lost_at_the_lock)
        refused = client.post("/v1/finetune/llm", json=make_payload())
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"].isdigit()
    assert active_job_count() == 0
    assert client.post("/v1/finetune/llm", json=make_payload()).status_code == 201
