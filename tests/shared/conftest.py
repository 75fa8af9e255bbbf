"""Fixtures for the tests of `shared`: a session on a migrated database, SQLite or
PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from shared.db import make_engine
from shared.migrate import upgrade_database


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A session on a database the migrations built (columns added by later revisions
    included), once on SQLite and once on PostgreSQL."""
    url = (f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    upgrade_database(url)
    engine = make_engine(url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No TUNERY_ variable of the machine's environment, and a data dir of the test's own:
    settings read only what the test sets."""
    for name in list(os.environ):
        if name.upper().startswith("TUNERY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TUNERY_DATA_DIR", str(tmp_path))
    return monkeypatch
