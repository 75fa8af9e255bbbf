"""The API's connection pool on PostgreSQL: connections opened for a burst of concurrent
requests stay open for the next burst, instead of being closed and opened again (a new
PostgreSQL backend process each time)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Connection, event

from shared.db import get_engine, reset_engines
from shared.settings import get_settings


def test_a_second_burst_of_concurrent_sessions_opens_no_connection(
    tunery_env: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNERY_DATABASE_URL", postgres_url)
    get_settings.cache_clear()
    reset_engines()
    engine = get_engine()
    opened: list[object] = []
    event.listen(engine, "connect", lambda dbapi_connection, _record: opened.append(1))
    burst = 12  # concurrent requests: above SQLAlchemy's 5 kept, within the 15 allowed

    def run_burst() -> None:
        connections: list[Connection] = [engine.connect() for _ in range(burst)]
        for connection in connections:
            connection.close()

    run_burst()
    assert len(opened) == burst
    run_burst()
    assert len(opened) == burst, "connections of the first burst were closed and reopened"
    engine.dispose()
