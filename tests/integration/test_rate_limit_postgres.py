"""The active-jobs cap on PostgreSQL: concurrent submits of one tenant, from real threads
through the real app, cannot pass it."""

from __future__ import annotations

from typing import Any

from shared.db import reset_engines
from tests.api.test_limits import (  # noqa: F401 - make_client is a fixture
    active_job_count,
    make_client,
    submit_concurrently,
)


def test_twenty_concurrent_submits_on_postgres_never_pass_the_cap(
    make_client: Any, postgres_url: str  # noqa: F811
) -> None:
    reset_engines()
    client = make_client(database_url=postgres_url, max_active_jobs_per_tenant=10)
    statuses = submit_concurrently(client, 20)
    assert sorted(statuses) == [201] * 10 + [429] * 10
    assert active_job_count() == 10
