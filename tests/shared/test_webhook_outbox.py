"""The outbox on a real database: every change a job's webhooks report writes its deliveries
in the change's own transaction (so a rollback drops both, and a commit keeps both), for the
enabled endpoints of the job's tenant that take the event's type only."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.maintenance import reap
from shared.models import (
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from shared.webhooks import endpoints, signing_secrets
from shared.webhooks.events import EVENT_TYPES
from tests.conftest import make_payload

REQUEST = FinetuneRequest.model_validate(make_payload())
URL = "https://hooks.example.com/tunery"


@pytest.fixture
def tenant(tunery_env: Path) -> str:
    from shared.migrate import upgrade_database

    upgrade_database(get_settings().database.url)
    with session_scope() as session:
        key = create_api_key(session, "hooked")
        return key.tenant_id


def add_endpoint(tenant_id: str, event_types: tuple[str, ...] = EVENT_TYPES) -> str:
    # Written as the API writes it once the URL passed: this host does not resolve here.
    with session_scope() as session:
        secret = signing_secrets.new_secret()
        endpoint = WebhookEndpoint(
            id=f"we_{uuid.uuid4().hex}", tenant_id=tenant_id, name="t",
            url=URL, event_types=list(event_types), secret=signing_secrets.seal(secret),
            secret_hint=signing_secrets.hint(secret))
        session.add(endpoint)
        return endpoint.id


def deliveries(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)).all()
    return [{"endpoint": row.endpoint_id, **json.loads(row.body)} for row in rows]


def test_a_jobs_life_writes_one_delivery_per_change_in_the_changes_transaction(
    tenant: str,
) -> None:
    endpoint = add_endpoint(tenant)
    with session_scope() as session:
        job = jobs.create_job(session, tenant, REQUEST, max_attempts=2, device_class="train")
    with session_scope() as session:
        claim = jobs.claim_job(session, job.id, "w1", 60)
        assert claim is not None
    with session_scope() as session:
        jobs.record_metric(session, job.id, 1, 0, {"epoch": 0.0, "eval_loss": 2.5})
        jobs.record_metric(session, job.id, 1, 1, {"loss": 2.0})  # no news
        jobs.record_checkpoint(session, job.id, 1, 5, "checkpoint at step 5 saved")
    with session_scope() as session:
        assert jobs.transition(session, job.id, JobStatus.COMPLETED, attempt=1)
        sent = deliveries(session)
    assert [d["type"] for d in sent] == [
        "tunery.job.queued", "tunery.job.started", "tunery.job.evaluated",
        "tunery.job.checkpoint_saved", "fine_tuning.job.succeeded"]
    assert {d["endpoint"] for d in sent} == {endpoint}
    assert sent[2]["data"] == {"id": f"ftjob-{job.id}", "job_id": job.id, "attempt": 1,
                               "step": 0, "eval_loss": 2.5}
    assert sent[3]["data"]["step"] == 5
    assert sent[4]["data"] == {"id": f"ftjob-{job.id}"}
    assert len({d["id"] for d in sent}) == 5


def test_a_rolled_back_change_leaves_no_delivery_and_a_committed_one_keeps_it(
    tenant: str,
) -> None:
    add_endpoint(tenant)
    with session_scope() as session:
        job = jobs.create_job(session, tenant, REQUEST, max_attempts=2, device_class="train")
    with pytest.raises(RuntimeError), session_scope() as session:
        jobs.request_cancel(session, tenant, job.id)
        raise RuntimeError("the process dies before the commit")
    with session_scope() as session:
        assert session.get_one(Job, job.id).status == JobStatus.QUEUED.value
        assert [d["type"] for d in deliveries(session)] == ["tunery.job.queued"]
        jobs.request_cancel(session, tenant, job.id)
    with session_scope() as session:
        assert [d["type"] for d in deliveries(session)] == [
            "tunery.job.queued", "fine_tuning.job.cancelled"]


def test_only_enabled_endpoints_of_the_tenant_that_take_the_type_get_a_delivery(
    tenant: str,
) -> None:
    takes_all = add_endpoint(tenant)
    takes_cancel = add_endpoint(tenant, ("fine_tuning.job.cancelled",))
    with session_scope() as session:
        other = create_api_key(session, "other").tenant_id
    add_endpoint(other)
    disabled = add_endpoint(tenant, ("fine_tuning.job.cancelled", "tunery.job.queued"))
    with session_scope() as session:
        endpoints.disable(session, session.get_one(WebhookEndpoint, disabled), "x")
    with session_scope() as session:
        job = jobs.create_job(session, tenant, REQUEST, max_attempts=2, device_class="train")
        jobs.request_cancel(session, tenant, job.id)
    with session_scope() as session:
        got = {(d["endpoint"], d["type"]) for d in deliveries(session)}
    assert got == {(takes_all, "tunery.job.queued"), (takes_all, "fine_tuning.job.cancelled"),
                   (takes_cancel, "fine_tuning.job.cancelled")}


def test_the_sweep_forgets_finished_deliveries_past_their_history_only(tenant: str) -> None:
    add_endpoint(tenant)
    with session_scope() as session:
        for _ in range(3):
            jobs.create_job(session, tenant, REQUEST, max_attempts=2, device_class="train")
    long_ago = utcnow() - timedelta(days=31)
    with session_scope() as session:
        old, recent, waiting = session.scalars(select(WebhookDelivery.id)).all()
        # Delivered a month ago, delivered just now, and still waiting since a month ago.
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == old).values(
            status=DeliveryStatus.DELIVERED.value, finished_at=long_ago))
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == recent).values(
            status=DeliveryStatus.DELIVERED.value, finished_at=utcnow()))
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == waiting).values(
            created_at=long_ago))
    assert reap(get_settings()).pruned_deliveries == 1
    with session_scope() as session:
        assert set(session.scalars(select(WebhookDelivery.id))) == {recent, waiting}
