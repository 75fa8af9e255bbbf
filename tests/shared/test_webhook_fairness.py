"""The sender's share between tenants, with the real sender threads (`start_senders`) and
real receivers on 127.0.0.1: a tenant whose receiver accepts every request and never answers
holds at most its share of the senders, and at most one per endpoint, so the other tenants'
deliveries, and its own other endpoints', still arrive while its requests are held."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import WebhookDelivery, WebhookEndpoint
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from shared.webhooks import signing_secrets
from shared.webhooks.sender import start_senders
from tests.conftest import make_payload
from tests.webhook_receiver import Receiver, receiver

REQUEST = FinetuneRequest.model_validate(make_payload())
SENDER_THREADS = 4
MAX_IN_FLIGHT_PER_TENANT = 2


@pytest.fixture
def senders_env(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback receivers allowed (as an operator allows a private host); a deadline longer
    than any test runs, so that a held request stays in flight until the test releases it."""
    monkeypatch.setenv("TUNERY_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("TUNERY_ALLOWED_PRIVATE_URL_HOSTS", '["127.0.0.1"]')
    monkeypatch.setenv("TUNERY_WEBHOOK_TIMEOUT_S", "120")
    monkeypatch.setenv("TUNERY_WEBHOOK_SENDER_THREADS", str(SENDER_THREADS))
    monkeypatch.setenv("TUNERY_WEBHOOK_MAX_IN_FLIGHT_PER_TENANT", str(MAX_IN_FLIGHT_PER_TENANT))
    monkeypatch.setenv("TUNERY_WEBHOOK_POLL_INTERVAL_S", "0.05")
    get_settings.cache_clear()
    upgrade_database(get_settings().database.url)


def new_tenant(name: str) -> str:
    with session_scope() as session:
        return create_api_key(session, name).tenant_id


def add_endpoint(tenant_id: str, url: str) -> str:
    with session_scope() as session:
        secret = signing_secrets.new_secret()
        endpoint = WebhookEndpoint(
            id=f"we_{uuid.uuid4().hex}", tenant_id=tenant_id, name="r", url=url,
            event_types=["tunery.job.queued"], secret=signing_secrets.seal(secret),
            secret_hint=signing_secrets.hint(secret))
        session.add(endpoint)
        return endpoint.id


def queue_jobs(tenant_id: str, count: int) -> None:
    """`count` jobs: one delivery each to every endpoint of the tenant, due now."""
    with session_scope() as session:
        for _ in range(count):
            jobs.create_job(session, tenant_id, REQUEST, max_attempts=1, device_class="train")


@contextmanager
def running_senders(held: Receiver) -> Iterator[None]:
    senders = start_senders(get_settings(), "fairness")
    try:
        yield
    finally:
        for sender in senders:
            sender.stop()
        held.release()  # the held attempts answer, and their senders see the stop
        for sender in senders:
            sender.join(timeout=60)


def endpoints_of(received_ids: list[str]) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(WebhookDelivery.endpoint_id)
                                    .where(WebhookDelivery.id.in_(received_ids))))


def test_a_tenant_whose_receivers_never_answer_holds_only_its_share_of_the_senders(
    senders_env: None,
) -> None:
    with receiver(hold_all=True) as slow, receiver() as fine:
        hoarder = new_tenant("hoarder")
        for _ in range(6):
            add_endpoint(hoarder, slow.url)
        queue_jobs(hoarder, 3)  # 18 deliveries, all due before the other tenant's
        neighbour = new_tenant("neighbour")
        add_endpoint(neighbour, fine.url)
        queue_jobs(neighbour, 1)
        with running_senders(slow):
            held = slow.wait_for(MAX_IN_FLIGHT_PER_TENANT)
            # More senders than the share are free, yet the held tenant's deliveries are
            # due first: without the share they would take every sender, and the
            # neighbour's delivery would wait behind them until their deadlines passed.
            [arrived] = fine.wait_for(1)
            # No held request has been answered, so every one received is still in flight.
            still_held = [r.webhook_id for r in slow.received]
            assert not slow.released.is_set()
    assert arrived.body
    assert len(still_held) == MAX_IN_FLIGHT_PER_TENANT
    assert [r.webhook_id for r in held] == still_held
    assert len(set(endpoints_of(still_held))) == MAX_IN_FLIGHT_PER_TENANT


def test_a_slow_endpoint_leaves_its_tenants_other_endpoints_a_sender(
    senders_env: None,
) -> None:
    with receiver(hold_all=True) as slow, receiver() as fine:
        tenant = new_tenant("mixed")
        slow_endpoint = add_endpoint(tenant, slow.url)
        queue_jobs(tenant, 6)  # the slow endpoint's deliveries are due first
        add_endpoint(tenant, fine.url)
        queue_jobs(tenant, 1)  # one to each endpoint, the slow one's again first
        with running_senders(slow):
            slow.wait_for(1)
            fine.wait_for(1)
            still_held = [r.webhook_id for r in slow.received]
            assert not slow.released.is_set()
    assert endpoints_of(still_held) == [slow_endpoint]
