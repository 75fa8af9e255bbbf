"""Fixtures for integration tests: real services reached over the network."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from shared.db import make_engine
from shared.migrate import upgrade_database
from shared.storage import S3Storage


@pytest.fixture
def pg_session(postgres_url: str) -> Iterator[Session]:
    """A session on the migrated PostgreSQL test database."""
    upgrade_database(postgres_url)
    engine = make_engine(postgres_url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


@pytest.fixture
def s3_storage(s3_endpoint_url: str, s3_credentials: dict[str, str]) -> S3Storage:
    """An S3Storage in a fresh bucket, under a key prefix, so tests never see each other's data."""
    store = S3Storage(
        f"tunery-test-{uuid.uuid4().hex[:12]}",
        "store-root",
        endpoint_url=s3_endpoint_url,
        **s3_credentials,
    )
    store.ensure_bucket()
    return store
