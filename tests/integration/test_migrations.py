"""Alembic builds the schema from empty on SQLite and PostgreSQL, and it matches the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from shared.db import make_engine
from shared.migrate import downgrade_database, upgrade_database
from shared.models import Base

TABLES = {
    "tenants", "api_keys", "jobs", "job_events", "job_logs", "job_metrics", "datasets",
    "idempotency_keys", "deployments", "deployment_events", "webhook_endpoints",
    "webhook_deliveries", "webhook_attempts",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("postgres_url")


def test_upgrade_from_empty_creates_every_table_matching_the_models(empty_database: str) -> None:
    upgrade_database(empty_database)
    engine = make_engine(empty_database)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_downgrade_to_base_and_upgrade_again(empty_database: str) -> None:
    upgrade_database(empty_database)
    downgrade_database(empty_database, "base")
    engine = make_engine(empty_database)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    upgrade_database(empty_database)
