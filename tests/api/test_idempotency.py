"""`Idempotency-Key` on POST /v1/finetune/llm, against a real app on SQLite."""

from __future__ import annotations

import json
import queue
import threading
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from shared.db import session_scope
from shared.idempotency import KeyedRequest, StoredResponse
from shared.models import IdempotencyKey, Job, utcnow
from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.conftest import make_payload

URL = "/v1/finetune/llm"


def post(client: TestClient, key: str | bytes, payload: dict[str, Any] | None = None,
         **headers: str) -> Any:
    return client.post(URL, json=payload or make_payload(),
                       headers={"Idempotency-Key": key, **headers})  # type: ignore[dict-item]


def job_ids() -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(Job.id)))


def records() -> list[IdempotencyKey]:
    with session_scope() as session:
        return list(session.scalars(select(IdempotencyKey)))


def test_retry_with_the_same_key_and_body_replays_the_first_response(client: TestClient) -> None:
    first = post(client, "order-42")
    again = post(client, "order-42")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert job_ids() == [first.json()["job_id"]]


def test_key_order_and_whitespace_do_not_make_a_different_body(client: TestClient) -> None:
    payload = make_payload()
    first = post(client, "k", payload)
    reordered = {section: dict(reversed(list(values.items())))
                 for section, values in reversed(list(payload.items()))}
    raw = json.dumps(reordered, indent=4)
    again = client.post(URL, content=raw, headers={"Idempotency-Key": "k",
                                                   "Content-Type": "application/json"})
    assert again.status_code == 201
    assert again.json() == first.json()
    assert len(job_ids()) == 1


def test_same_key_with_a_different_body_is_a_422_naming_the_header(client: TestClient) -> None:
    first = post(client, "k")
    other = post(client, "k", make_payload(training_config={"num_train_epochs": 2}))
    assert other.status_code == 422
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert "different request body" in error["message"]
    assert error["fields"] == [{"path": "Idempotency-Key", "message": error["message"]}]
    assert job_ids() == [first.json()["job_id"]]


@pytest.mark.parametrize("key", ["", "x" * 256, "café".encode(), "tab\there", "nul\x00"])
def test_malformed_key_is_a_422_naming_the_header(client: TestClient, key: str | bytes) -> None:
    response = post(client, key)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["fields"][0]["path"] == "Idempotency-Key"
    assert "printable ASCII" in error["message"]
    assert job_ids() == []


def test_longest_key_and_every_printable_character_are_accepted(client: TestClient) -> None:
    printable = "".join(chr(c) for c in range(0x21, 0x7F))
    assert post(client, "k" * 255).status_code == 201
    assert post(client, printable).status_code == 201
    assert len(job_ids()) == 2


def test_keys_are_scoped_to_the_api_key(client: TestClient) -> None:
    mine = post(client, "shared-key")
    other_key = new_key("tenant-b")
    theirs = post(client, "shared-key", Authorization=f"Bearer {other_key}")
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["job_id"] != theirs.json()["job_id"]
    assert len(job_ids()) == 2


def test_an_expired_key_starts_a_new_job_and_replaces_its_record(client: TestClient) -> None:
    first = post(client, "k").json()["job_id"]
    ttl = get_settings().limits.idempotency_ttl_s
    with session_scope() as session:
        session.execute(update(IdempotencyKey).values(
            created_at=utcnow() - timedelta(seconds=ttl + 1)))
    again = post(client, "k")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers
    second = again.json()["job_id"]
    assert second != first
    assert [r.job_id for r in records()] == [second]
    # The replaced record no longer holds the old body either: a new body under it is refused.
    assert post(client, "k", make_payload(training_config={"num_train_epochs": 2})
                ).status_code == 422


def test_a_refused_submission_stores_nothing_under_the_key(client: TestClient) -> None:
    bad_value = post(client, "k", make_payload(pretrainedmodel_config={"lora_r": 0}))
    bad_source = post(client, "k", make_payload(data_path="/etc/passwd"))
    assert bad_value.status_code == bad_source.status_code == 422
    assert records() == []
    assert job_ids() == []
    good = post(client, "k")
    assert good.status_code == 201
    assert [r.job_id for r in records()] == [good.json()["job_id"]]


def test_only_the_first_submission_sends_a_wake_up(client: TestClient) -> None:
    from shared.queue import get_celery

    job_id = post(client, "k").json()["job_id"]
    assert post(client, "k").status_code == 201
    with get_celery().connection_for_read() as conn:
        train = conn.SimpleQueue("train", no_ack=True)
        assert train.get(timeout=5).headers["argsrepr"] == repr([job_id])
        with pytest.raises(queue.Empty):
            train.get(timeout=1)
        train.close()


def test_concurrent_retries_on_sqlite_create_one_job(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost_races = count_lost_races(monkeypatch)
    barrier = threading.Barrier(6)
    responses: list[Any] = []

    def submit() -> None:
        barrier.wait()
        responses.append(post(client, "concurrent"))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {(r.status_code, r.text) for r in responses} == {(201, responses[0].text)}
    assert job_ids() == [responses[0].json()["job_id"]]
    assert sum("Idempotent-Replayed" in r.headers for r in responses) == 5
    assert len(lost_races) <= 5


def test_openapi_documents_the_header(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"][URL]["post"]
    header = next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key")
    assert header["in"] == "header"
    assert header["required"] is False
    assert "same key" in header["description"]


def count_lost_races(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each submission that hit the unique constraint and replayed the winner."""
    lost: list[str] = []
    original = KeyedRequest.record

    def record(self: KeyedRequest, session: Any, response: StoredResponse, *,
               job_id: str | None = None, dataset_id: str | None = None) -> StoredResponse | None:
        earlier = original(self, session, response, job_id=job_id, dataset_id=dataset_id)
        if earlier is not None:
            lost.append(str(job_id or dataset_id))
        return earlier

    monkeypatch.setattr(KeyedRequest, "record", record)
    return lost
