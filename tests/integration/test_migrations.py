"""Alembic builds the schema from empty on SQLite and PostgreSQL, and it matches the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from shared.db import make_engine
from shared.migrate import alembic_config, downgrade_database, upgrade_database
from shared.models import Base
from shared.settings import PROJECT_ROOT

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


def test_alembic_upgrade_head_from_the_repository_root_reads_tunery_s_database_url(
    empty_database: str, tmp_path: Path,
) -> None:
    """`alembic upgrade head` as an operator types it: alembic.ini names no URL, so the one in
    TUNERY_DATABASE_URL is migrated, as `tunery db upgrade` would."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TUNERY_")}
    env.update(TUNERY_DATABASE_URL=empty_database, TUNERY_DATA_DIR=str(tmp_path / "data"))
    alembic = Path(sys.executable).with_name("alembic")

    result = subprocess.run([str(alembic), "upgrade", "head"], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    head = ScriptDirectory.from_config(alembic_config(empty_database)).get_current_head()
    engine = make_engine(empty_database)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_jobs_from_before_device_classes_keep_the_default_queue(empty_database: str) -> None:
    """0018: a job queued before classes existed was sent to the queue `train`, the default
    class's: it keeps that class, so the default worker still claims it."""
    upgrade_database(empty_database, "0017")
    engine = make_engine(empty_database)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO tenants (id, name, created_at) "
                                 "VALUES ('t1', 'old', CURRENT_TIMESTAMP)"))
            conn.execute(sa.text(
                "INSERT INTO jobs (id, tenant_id, status, progress, payload, base_model, "
                "attempt, max_attempts, cancel_requested, pause_requested, created_at, "
                "updated_at) VALUES ('j1', 't1', 'QUEUED', 0, '{}', 'm', 0, 3, false, false, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        upgrade_database(empty_database)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT device_class FROM jobs")).scalar_one() == "train"
        downgrade_database(empty_database, "0017")
        with engine.connect() as conn:
            assert "device_class" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
            assert conn.execute(sa.text("SELECT id FROM jobs")).scalar_one() == "j1"
    finally:
        engine.dispose()
