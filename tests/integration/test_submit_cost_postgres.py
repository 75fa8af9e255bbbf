"""What one submit costs the database and the broker, counted rather than timed, on the full
stack's PostgreSQL and Redis: the submit is the API's costliest route (bench/api_load.py), and
each statement or broker command it gains costs every submit CPU in the API and the server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.db import reset_engines
from shared.queue import get_celery
from shared.settings import get_settings
from tests.api.test_limits import sql_and_commits
from tests.conftest import make_payload
from tests.integration.test_idempotency_postgres import new_key

URL = "/v1/finetune/llm"


@pytest.fixture
def full_stack_client(tunery_env: Path, postgres_url: str, redis_url: str,
                      monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app on PostgreSQL and Redis (the lifespan migrates), with a fresh key."""
    from api.main import create_app

    monkeypatch.setenv("TUNERY_DATABASE_URL", postgres_url)
    monkeypatch.setenv("TUNERY_BROKER_URL", redis_url)
    get_settings.cache_clear()
    get_celery.cache_clear()
    reset_engines()
    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {new_key('cost-tenant')}"
        yield client
    reset_engines()


@contextmanager
def redis_commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The name of every command any redis-py client of this process sends."""
    import redis

    sent: list[str] = []
    execute = redis.Redis.execute_command

    def counted(self: redis.Redis, *args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return execute(self, *args, **options)

    with monkeypatch.context() as patch:
        patch.setattr(redis.Redis, "execute_command", counted)
        yield sent


def what(sql: str) -> str:
    """A statement's kind and table: "SELECT api_keys", "INSERT jobs", "COMMIT"..."""
    words = sql.split()
    if words[0] == "SELECT":
        return f"SELECT {words[words.index('FROM') + 1]}"
    if words[0] == "INSERT":
        return f"INSERT {words[2]}"
    return " ".join(words[:2]) if words[0] in ("UPDATE", "DELETE") else words[0]


def test_a_keyed_submit_is_seven_statements_one_commit_and_one_broker_command(
    full_stack_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = full_stack_client
    # The key's first use writes its last_used_at (once a minute), and the broker connects.
    assert client.post(URL, json=make_payload(), headers={"Idempotency-Key": "a"}
                       ).status_code == 201
    with sql_and_commits() as seen, redis_commands(monkeypatch) as sent:
        response = client.post(URL, json=make_payload(), headers={"Idempotency-Key": "b"})
    assert response.status_code == 201, response.text
    assert [what(sql) for sql in seen] == [
        "SELECT api_keys",  # the caller's key
        "SELECT idempotency_keys",  # a response to replay?
        "INSERT jobs",
        "INSERT job_events",
        "INSERT idempotency_keys",  # replaces an expired record in the same statement
        "UPDATE tenants",  # the tenant's lock, for the count and the commit only
        "SELECT jobs",  # the tenant's active jobs
        "COMMIT",
    ]
    assert "ON CONFLICT" in seen[4]
    assert sent == ["LPUSH"]  # the wake-up, after the commit


def test_a_replay_is_two_statements_and_sends_nothing(
    full_stack_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = full_stack_client
    first = client.post(URL, json=make_payload(), headers={"Idempotency-Key": "a"})
    with sql_and_commits() as seen, redis_commands(monkeypatch) as sent:
        again = client.post(URL, json=make_payload(), headers={"Idempotency-Key": "a"})
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert [what(sql) for sql in seen] == ["SELECT api_keys", "SELECT idempotency_keys"]
    assert sent == []
