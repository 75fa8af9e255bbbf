"""Webhook delivery claims on PostgreSQL: a delivery a sender holds is skipped, not waited for,
by the others (FOR UPDATE SKIP LOCKED), and senders running at once never send one attempt
twice: every delivery reaches the receiver exactly once."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import reset_engines, session_factory, session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from shared.webhooks import signing_secrets
from shared.webhooks.deliveries import claim_due
from shared.webhooks.sender import send_next
from tests.conftest import make_payload
from tests.webhook_receiver import Receiver, receiver

REQUEST = FinetuneRequest.model_validate(make_payload())


@pytest.fixture
def on_postgres(tunery_env: Path, postgres_url: str,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TUNERY_DATABASE_URL", postgres_url)
    monkeypatch.setenv("TUNERY_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("TUNERY_ALLOWED_PRIVATE_URL_HOSTS", '["127.0.0.1"]')
    get_settings.cache_clear()
    reset_engines()
    upgrade_database(postgres_url)
    yield
    reset_engines()


def queued_jobs(url: str, count: int) -> None:
    """`count` jobs of a tenant with an endpoint at `url`: one delivery each."""
    with session_scope() as session:
        tenant = create_api_key(session, "claims").tenant_id
        secret = signing_secrets.new_secret()
        session.add(WebhookEndpoint(
            id=f"we_{uuid.uuid4().hex}", tenant_id=tenant, name="r", url=url,
            event_types=["tunery.job.queued"], secret=signing_secrets.seal(secret),
            secret_hint=signing_secrets.hint(secret)))
        session.flush()
        for _ in range(count):
            jobs.create_job(session, tenant, REQUEST, max_attempts=1)


def test_a_held_delivery_is_skipped_not_waited_for(on_postgres: None) -> None:
    with receiver() as running:
        queued_jobs(running.url, 2)
    first: Session = session_factory()()
    second: Session = session_factory()()
    third: Session = session_factory()()
    try:
        held = claim_due(first, "sender-1", 30)  # its transaction stays open: rows locked
        other = claim_due(second, "sender-2", 30)
        assert held is not None and other is not None
        assert held.id != other.id
        assert claim_due(third, "sender-3", 30) is None
        first.commit()
        second.commit()
        # Committed, the leases keep them apart as the locks did.
        assert claim_due(third, "sender-3", 30) is None
    finally:
        for session in (first, second, third):
            session.rollback()
            session.close()


def test_senders_running_at_once_send_every_delivery_exactly_once(on_postgres: None) -> None:
    count = 40
    with receiver() as running:
        queued_jobs(running.url, count)
        errors: list[BaseException] = []

        def send_all(name: str) -> None:
            try:
                while send_next(get_settings(), name):
                    pass
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        senders = [threading.Thread(target=send_all, args=(f"sender-{n}",)) for n in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=120)
        assert errors == []
        received = _received_ids(running, count)
    assert Counter(received).most_common(1)[0][1] == 1
    with session_scope() as session:
        statuses = session.scalars(select(WebhookDelivery.status)).all()
        attempts = session.scalars(select(WebhookAttempt.number)).all()
    assert statuses == [DeliveryStatus.DELIVERED.value] * count
    assert sorted(attempts) == [1] * count


def _received_ids(running: Receiver, count: int) -> list[str]:
    return [r.webhook_id for r in running.wait_for(count)]
