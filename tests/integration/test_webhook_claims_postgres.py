"""Webhook delivery claims on PostgreSQL: a delivery a sender holds is skipped, not waited for,
by the others (FOR UPDATE SKIP LOCKED), senders running at once never send one attempt
twice: every delivery reaches the receiver exactly once, and claims racing each other never
give a tenant more than its share by more than one per other claimer."""

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
from shared.webhooks.deliveries import ClaimedDelivery, claim_due
from shared.webhooks.sender import send_next
from tests.conftest import make_payload
from tests.webhook_receiver import Receiver, receiver

REQUEST = FinetuneRequest.model_validate(make_payload())
MAX_IN_FLIGHT_PER_TENANT = 2


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


def queued_jobs(url: str, count: int, endpoints: int = 1) -> str:
    """`count` jobs of a new tenant with `endpoints` endpoints at `url`: one delivery each
    to every endpoint; the tenant's id."""
    with session_scope() as session:
        tenant = create_api_key(session, f"claims-{uuid.uuid4().hex[:8]}").tenant_id
        for _ in range(endpoints):
            secret = signing_secrets.new_secret()
            session.add(WebhookEndpoint(
                id=f"we_{uuid.uuid4().hex}", tenant_id=tenant, name="r", url=url,
                event_types=["tunery.job.queued"], secret=signing_secrets.seal(secret),
                secret_hint=signing_secrets.hint(secret)))
        session.flush()
        for _ in range(count):
            jobs.create_job(session, tenant, REQUEST, max_attempts=1, device_class="train")
    return tenant


def claim(session: Session, owner: str) -> ClaimedDelivery | None:
    return claim_due(session, owner, 30, MAX_IN_FLIGHT_PER_TENANT)


def test_a_held_delivery_is_skipped_not_waited_for(on_postgres: None) -> None:
    with receiver() as running:
        queued_jobs(running.url, 1, endpoints=2)
    first: Session = session_factory()()
    second: Session = session_factory()()
    third: Session = session_factory()()
    try:
        held = claim(first, "sender-1")  # its transaction stays open: rows locked
        other = claim(second, "sender-2")
        assert held is not None and other is not None
        assert held.id != other.id
        assert claim(third, "sender-3") is None
        first.commit()
        second.commit()
        # Committed, the leases keep them apart as the locks did.
        assert claim(third, "sender-3") is None
    finally:
        for session in (first, second, third):
            session.rollback()
            session.close()


def test_senders_running_at_once_send_every_delivery_exactly_once(on_postgres: None) -> None:
    count = 40
    with receiver() as running:
        # Several tenants and endpoints, so that their shares let every sender work at once.
        for _ in range(4):
            queued_jobs(running.url, 5, endpoints=2)
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


def test_racing_claims_give_a_tenant_at_most_its_share_and_one_more_per_other_claimer(
    on_postgres: None,
) -> None:
    claimers = 4
    with receiver() as running:  # nothing is sent: the claims only take leases
        tenants = [queued_jobs(running.url, 3, endpoints=6) for _ in range(3)]
    barrier = threading.Barrier(claimers, timeout=60)
    taken: list[ClaimedDelivery | None] = [None] * claimers
    errors: list[BaseException] = []

    def claim_in_rounds(n: int) -> None:
        # Every round the claimers start together, so their claims overlap; leases are never
        # given back, and the rounds end when nobody could take anything.
        try:
            while True:
                barrier.wait()
                with session_scope() as session:
                    taken[n] = claim(session, f"claimer-{n}")
                barrier.wait()
                if all(claimed is None for claimed in taken):
                    return
                barrier.wait()  # everyone has read this round's results
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=claim_in_rounds, args=(n,)) for n in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    with session_scope() as session:
        leased = session.execute(
            select(WebhookEndpoint.tenant_id, WebhookDelivery.endpoint_id)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.lease_owner.is_not(None))
        ).all()
    per_tenant = Counter(tenant for tenant, _ in leased)
    per_endpoint = Counter(endpoint for _, endpoint in leased)
    # A claim misses only the leases of claims running beside it, one per other claimer.
    assert all(per_tenant[tenant] <= MAX_IN_FLIGHT_PER_TENANT + claimers - 1
               for tenant in tenants), per_tenant
    assert all(count <= claimers for count in per_endpoint.values()), per_endpoint
    # And each tenant got its share: nobody was crowded out.
    assert all(per_tenant[tenant] >= MAX_IN_FLIGHT_PER_TENANT for tenant in tenants), per_tenant
