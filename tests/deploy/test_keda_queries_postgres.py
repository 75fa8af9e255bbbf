"""The postgresql triggers of the KEDA ScaledObjects, run as KEDA runs them, on PostgreSQL with
Tunery's migrated schema: each class counts its own QUEUED and RUNNING jobs, so that a running
job keeps its worker after Celery took its message off the Redis list; `train`, the default
queue, also counts exports being built and (as one worker) webhook deliveries that are due.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.db import make_engine
from shared.migrate import upgrade_database
from shared.models import (
    DeliveryStatus,
    ExportStatus,
    Job,
    JobExport,
    JobStatus,
    Tenant,
    WebhookDelivery,
    WebhookEndpoint,
)
from tests.deploy.kubernetes_manifests import named, render


def postgresql_query(device_class: str) -> str:
    scaler = named(render("gpu"), "ScaledObject", f"tunery-worker-{device_class}")
    (trigger,) = [t for t in scaler["spec"]["triggers"] if t["type"] == "postgresql"]
    query: str = trigger["metadata"]["query"]
    return query


@pytest.fixture
def session(postgres_url: str) -> Iterator[Session]:
    upgrade_database(postgres_url)
    engine = make_engine(postgres_url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


def add_job(session: Session, tenant: Tenant, device_class: str, status: JobStatus) -> Job:
    job = Job(tenant_id=tenant.id, status=status.value, payload={}, base_model="tiny",
              device_class=device_class)
    session.add(job)
    session.flush()
    return job


def workers_wanted(session: Session, device_class: str) -> int:
    session.commit()
    value = session.execute(text(postgresql_query(device_class))).scalar_one()
    return int(value)


def test_each_class_counts_its_queued_and_running_jobs_only(session: Session) -> None:
    tenant = Tenant(name=f"keda-{uuid.uuid4().hex[:8]}")
    session.add(tenant)
    session.flush()
    assert workers_wanted(session, "train") == workers_wanted(session, "gpu-x2") == 0

    add_job(session, tenant, "gpu-x2", JobStatus.QUEUED)
    assert (workers_wanted(session, "train"), workers_wanted(session, "gpu-x2")) == (0, 1)

    # Its message is off the Redis list once a worker took it: the database keeps it counted.
    add_job(session, tenant, "gpu-x2", JobStatus.RUNNING)
    add_job(session, tenant, "train", JobStatus.RUNNING)
    assert (workers_wanted(session, "train"), workers_wanted(session, "gpu-x2")) == (1, 2)

    for status in (JobStatus.PAUSED, JobStatus.COMPLETED, JobStatus.FAILED,
                   JobStatus.CANCELLED):
        add_job(session, tenant, "train", status)
        add_job(session, tenant, "gpu-x2", status)
    assert (workers_wanted(session, "train"), workers_wanted(session, "gpu-x2")) == (1, 2)


def test_train_also_counts_exports_and_due_webhook_deliveries(session: Session) -> None:
    tenant = Tenant(name=f"keda-{uuid.uuid4().hex[:8]}")
    session.add(tenant)
    session.flush()
    done = add_job(session, tenant, "gpu-x2", JobStatus.COMPLETED)
    session.add(JobExport(job_id=done.id, kind="merged", status=ExportStatus.RUNNING.value))
    session.add(JobExport(job_id=done.id, kind="gguf-f16", status=ExportStatus.COMPLETED.value))
    assert workers_wanted(session, "train") == 1

    endpoint = WebhookEndpoint(id=f"we_{uuid.uuid4().hex}", tenant_id=tenant.id, name="r",
                               url="https://example.org/hook", event_types=["*"],
                               secret="sealed", secret_hint="…abcd")
    session.add(endpoint)
    session.flush()
    now = datetime.now(UTC)

    def delivery(status: DeliveryStatus, due: datetime) -> WebhookDelivery:
        return WebhookDelivery(id=f"msg_{uuid.uuid4().hex}", endpoint_id=endpoint.id,
                               event_id=uuid.uuid4().hex, event_type="tunery.job.completed",
                               body="{}", status=status.value, next_attempt_at=due)

    # A retry due in an hour needs no worker yet; delivered ones never do.
    session.add(delivery(DeliveryStatus.PENDING, now + timedelta(hours=1)))
    session.add(delivery(DeliveryStatus.DELIVERED, now - timedelta(minutes=1)))
    assert workers_wanted(session, "train") == 1

    # Due deliveries want one worker, however many there are; gpu-x2 counts none of it.
    session.add_all([delivery(DeliveryStatus.PENDING, now - timedelta(seconds=5))
                     for _ in range(3)])
    assert workers_wanted(session, "train") == 2
    assert workers_wanted(session, "gpu-x2") == 0
