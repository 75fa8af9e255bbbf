"""A tenant's webhook endpoint cap under creates running at once, on PostgreSQL (where each
create counts in its own transaction) and on the embedded SQLite file: never one more than
the cap, however the creates interleave."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shared.db import reset_engines, session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import WebhookEndpoint
from shared.settings import get_settings
from shared.webhooks.endpoints import MAX_ENDPOINTS_PER_TENANT, EndpointRefused, create_endpoint


@pytest.fixture
def loopback_allowed(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("TUNERY_ALLOWED_PRIVATE_URL_HOSTS", '["127.0.0.1"]')
    get_settings.cache_clear()


@pytest.fixture
def on_postgres(loopback_allowed: None, postgres_url: str,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TUNERY_DATABASE_URL", postgres_url)
    get_settings.cache_clear()
    reset_engines()
    upgrade_database(postgres_url)
    yield
    reset_engines()


@pytest.fixture
def on_sqlite(loopback_allowed: None) -> Iterator[None]:
    reset_engines()
    upgrade_database(get_settings().database.url)
    yield
    reset_engines()


def create_at_once(creates: int) -> tuple[int, int, list[BaseException]]:
    """`creates` endpoints of one tenant created by as many threads, released together; how
    many were created, how many refused for the cap, and anything else raised."""
    with session_scope() as session:
        tenant_id = create_api_key(session, "cap").tenant_id
    start = threading.Barrier(creates)
    lock = threading.Lock()
    created, refused, errors = [0], [0], []

    def create_one() -> None:
        start.wait()
        try:
            with session_scope() as session:
                create_endpoint(session, tenant_id, url="http://127.0.0.1:9/hooks", name=None,
                                event_types=["tunery.job.queued"], settings=get_settings())
            with lock:
                created[0] += 1
        except EndpointRefused:
            with lock:
                refused[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=create_one) for _ in range(creates)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    with session_scope() as session:
        stored = session.scalar(select(func.count()).select_from(WebhookEndpoint)
                                .where(WebhookEndpoint.tenant_id == tenant_id))
    assert stored == created[0]
    return created[0], refused[0], errors


def test_creates_at_once_never_pass_the_cap_on_postgres(on_postgres: None) -> None:
    created, refused, errors = create_at_once(MAX_ENDPOINTS_PER_TENANT + 10)
    assert errors == []
    assert (created, refused) == (MAX_ENDPOINTS_PER_TENANT, 10)


def test_creates_at_once_never_pass_the_cap_on_sqlite(on_sqlite: None) -> None:
    created, refused, errors = create_at_once(MAX_ENDPOINTS_PER_TENANT + 10)
    assert errors == []
    assert (created, refused) == (MAX_ENDPOINTS_PER_TENANT, 10)
