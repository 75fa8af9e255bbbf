"""Secrets the API receives (payload tokens, API keys) never come back in a response, never
reach a log record, and never sit in the database in plaintext; a key's last use is written at
most once a minute."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update

from api.access_log import RedactQueryFilter
from shared.db import get_engine, session_scope
from shared.keys import LAST_USED_RESOLUTION_S
from shared.models import ApiKey, IdempotencyKey, Job, utcnow
from shared.payload_secrets import ENCRYPTED_PREFIX
from tests.conftest import make_payload

URL = "/v1/finetune/llm"
HF_TOKEN = "hf_" + "h" * 34
WANDB_KEY = "wandb" + "w" * 35
SESSION_TOKEN = "sess" + "s" * 28


def secret_payload() -> dict[str, Any]:
    payload = make_payload(logging_config={"wandb_login_key": WANDB_KEY})
    payload["hf_config"] = {"hf_token": HF_TOKEN}
    payload["user_session_token"] = SESSION_TOKEN
    return payload


def assert_no_secret(text: str, *extra: str) -> None:
    for secret in (HF_TOKEN, WANDB_KEY, SESSION_TOKEN, *extra):
        assert secret not in text


def test_submitted_secrets_are_masked_in_every_response_and_encrypted_in_the_database(
    client: TestClient, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = client.post(URL, json=secret_payload(), headers={"Idempotency-Key": "once"})
    replay = client.post(URL, json=secret_payload(), headers={"Idempotency-Key": "once"})
    assert first.status_code == replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    job_id = first.json()["job_id"]

    job = client.get(f"{URL}/{job_id}")
    listing = client.get(URL)
    for response in (first, replay, job, listing):
        assert_no_secret(response.text, api_key)
    payload = job.json()["payload"]
    assert payload["hf_config"]["hf_token"] == "***"
    assert payload["logging_config"]["wandb_login_key"] == "***"
    assert payload["user_session_token"] == "***"
    assert listing.json()["items"][0]["payload"] == payload

    with session_scope() as session:
        stored = session.scalars(select(Job.payload)).one()
        replay_body = session.scalars(select(IdempotencyKey.response_body)).one()
    assert stored["hf_config"]["hf_token"].startswith(ENCRYPTED_PREFIX)
    assert stored["logging_config"]["wandb_login_key"].startswith(ENCRYPTED_PREFIX)
    assert_no_secret(json.dumps(stored) + json.dumps(replay_body), api_key)

    cancelled = client.post(f"{URL}/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert_no_secret(cancelled.text)
    with session_scope() as session:
        final = session.scalars(select(Job.payload)).one()
    assert final["hf_config"]["hf_token"] == "***"  # dropped with the job's end
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records), api_key)


def test_invalid_key_is_refused_without_logging_it(
    app_client: TestClient, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tampered = api_key[:-4] + "abcd"
    for token in (tampered, "tun_nope_" + "x" * 40, "garbage-" + "g" * 30):
        response = app_client.get(URL, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert token not in response.text
        assert token not in "\n".join(r.getMessage() for r in caplog.records)


def test_access_log_masks_the_upload_token() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "PUT", "/v1/upload/ds_1?token=s3cr3t-upload&x=1", "1.1", 200), None,
    )
    RedactQueryFilter().filter(record)
    assert record.getMessage() == (
        '127.0.0.1:5 - "PUT /v1/upload/ds_1?token=***&x=1 HTTP/1.1" 200'
    )


@pytest.fixture
def key_writes(client: TestClient) -> Iterator[list[str]]:
    """Every statement that writes to api_keys, as the engine sends it."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE API_KEYS"):
            seen.append(statement)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def last_used() -> Any:
    with session_scope() as session:
        return session.scalars(select(ApiKey.last_used_at)).one()


def test_last_used_is_written_at_most_once_a_minute(
    client: TestClient, key_writes: list[str]
) -> None:
    assert client.get(URL).status_code == 200
    first = last_used()
    assert first is not None and len(key_writes) == 1

    for _ in range(3):
        assert client.get(URL).status_code == 200
    assert last_used() == first
    assert len(key_writes) == 1  # reads within the minute do not write at all

    with session_scope() as session:
        session.execute(update(ApiKey).values(
            last_used_at=utcnow() - timedelta(seconds=LAST_USED_RESOLUTION_S + 1)))
    key_writes.clear()
    assert client.get(URL).status_code == 200
    assert last_used() > first
    assert len(key_writes) == 1


def test_a_request_that_lost_the_race_to_write_last_used_leaves_no_write_lock(
    client: TestClient,
) -> None:
    """Two requests read the key's old last_used_at; the first writes it, the second's UPDATE
    changes nothing. The second must still end its write transaction, or on SQLite every
    other writer waits behind it until its session closes."""
    from shared.db import session_factory
    from shared.keys import record_use

    assert client.get(URL).status_code == 200
    with session_scope() as session:
        session.execute(update(ApiKey).values(
            last_used_at=utcnow() - timedelta(seconds=LAST_USED_RESOLUTION_S + 1)))
    first, second = session_factory()(), session_factory()()
    try:
        key_first = first.scalars(select(ApiKey)).one()
        key_second = second.scalars(select(ApiKey)).one()
        assert record_use(first, key_first)
        first.commit()
        # What get_caller does with the answer: commit when the UPDATE ran.
        if record_use(second, key_second):
            second.commit()
        assert not second.in_transaction()
    finally:
        first.close()
        second.close()
