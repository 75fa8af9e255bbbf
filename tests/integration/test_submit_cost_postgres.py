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


@contextmanager
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """What the app sends PostgreSQL, seen at the driver (psycopg), as round trips: one per
    statement or commit, one for all the statements of a pipeline."""
    import psycopg

    trips: list[list[str]] = []
    in_pipeline = False
    execute, commit, pipeline = (psycopg.Cursor.execute, psycopg.Connection.commit,
                                 psycopg.Connection.pipeline)

    def counted_execute(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        if not in_pipeline:
            trips.append([])
        trips[-1].append(what(" ".join(str(query).split())))
        return execute(self, query, *args, **kwargs)

    def counted_commit(self: psycopg.Connection[Any]) -> None:
        trips.append(["COMMIT"])
        commit(self)

    @contextmanager
    def counted_pipeline(self: psycopg.Connection[Any]) -> Iterator[Any]:
        nonlocal in_pipeline
        trips.append([])
        in_pipeline = True
        try:
            with pipeline(self) as opened:
                yield opened
        finally:
            in_pipeline = False

    with monkeypatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", counted_execute)
        patch.setattr(psycopg.Connection, "commit", counted_commit)
        patch.setattr(psycopg.Connection, "pipeline", counted_pipeline)
        yield trips


def what(sql: str) -> str:
    """A statement's kind and table: "SELECT api_keys", "INSERT jobs", "UPDATE tenants"..."""
    words = sql.split()
    if words[0].upper() == "SELECT" and "FROM" in words:
        return f"SELECT {words[words.index('FROM') + 1]}"
    if words[0] == "INSERT":
        return f"INSERT {words[2]}"
    return " ".join(words[:2])


def test_a_keyed_submit_is_ten_round_trips_to_postgres_and_one_to_redis(
    full_stack_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = full_stack_client
    # The key's first use writes its last_used_at (once a minute), and the broker connects.
    assert client.post(URL, json=make_payload(), headers={"Idempotency-Key": "a"}
                       ).status_code == 201
    with round_trips(monkeypatch) as trips, redis_commands(monkeypatch) as sent:
        response = client.post(URL, json=make_payload(), headers={"Idempotency-Key": "b"})
    assert response.status_code == 201, response.text
    assert trips == [
        [";"],  # the pool's pre-ping of the connection it hands out, as on every request
        ["SELECT api_keys"],  # the caller's key
        # The caller's transaction ended and gave its connection back (api.deps.get_caller:
        # held across the wait for a route thread, a burst would starve the pool); the
        # route's first query takes one again and the pool pings it.
        [";"],
        ["SELECT idempotency_keys"],  # a response to replay?
        ["INSERT jobs"],
        ["INSERT job_events"],
        # Webhook endpoints to tell, whose deliveries commit with the job (none here).
        ["SELECT webhook_endpoints"],
        ["INSERT idempotency_keys"],  # an upsert: replaces an expired record
        # The tenant's lock and its active jobs in one round trip: locked from here to the
        # commit only.
        ["UPDATE tenants", "SELECT jobs"],
        ["COMMIT"],
    ]
    assert sent == ["LPUSH"]  # the wake-up, after the commit


def test_a_replay_is_two_statements_and_sends_nothing(
    full_stack_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = full_stack_client
    first = client.post(URL, json=make_payload(), headers={"Idempotency-Key": "a"})
    with round_trips(monkeypatch) as trips, redis_commands(monkeypatch) as sent:
        again = client.post(URL, json=make_payload(), headers={"Idempotency-Key": "a"})
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert trips == [[";"], ["SELECT api_keys"], [";"], ["SELECT idempotency_keys"]]
    assert sent == []
