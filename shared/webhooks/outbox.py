"""The outbox: one delivery row per (event, endpoint that takes it), written in the
transaction of the change the event reports.

A job's state change and the news of it commit together or not at all, so a process that
dies between the commit and the send loses nothing: the sender finds the row and sends it.
Called from `shared.jobs` (every status change, a metric row with an evaluation, a saved
checkpoint); nothing here commits.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.orm import Session

from shared.models import (
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from shared.webhooks.events import STATUS_EVENTS, job_event

_ENDPOINTS: Table = WebhookEndpoint.__table__  # type: ignore[assignment]
_DELIVERIES: Table = WebhookDelivery.__table__  # type: ignore[assignment]
# Runs with every status change of every job: built once, its value bound at execution.
_ENDPOINTS_OF_JOB = (
    select(_ENDPOINTS.c.id, _ENDPOINTS.c.event_types)
    .where(_ENDPOINTS.c.tenant_id == select(Job.tenant_id)
           .where(Job.id == bindparam("job_id")).scalar_subquery(),
           _ENDPOINTS.c.disabled_at.is_(None))
)
_INSERT_DELIVERY = insert(_DELIVERIES)


def new_delivery_id() -> str:
    """A delivery's id, which is the `webhook-id` of each of its attempts."""
    return f"wh_{uuid.uuid4().hex}"


def record_job_event(session: Session, job_id: str, event_type: str, **details: Any) -> int:
    """Add a delivery of the event `event_type` about job `job_id` for each enabled endpoint
    of the job's tenant that takes that type; how many. `details` go into a Tunery event's
    data (`shared.webhooks.events.job_event`)."""
    endpoints = [endpoint_id for endpoint_id, types
                 in session.execute(_ENDPOINTS_OF_JOB, {"job_id": job_id})
                 if event_type in types]
    if not endpoints:
        return 0
    now = utcnow()
    event = job_event(event_type, job_id, now, **details)
    session.execute(_INSERT_DELIVERY, [
        {"id": new_delivery_id(), "endpoint_id": endpoint_id, "event_id": event.id,
         "event_type": event.type, "body": event.body, "status": DeliveryStatus.PENDING.value,
         "is_test": False, "attempts": 0, "next_attempt_at": now, "created_at": now}
        for endpoint_id in endpoints
    ])
    return len(endpoints)


def record_status_change(session: Session, job_id: str, to: JobStatus, attempt: int) -> int:
    """`record_job_event` for job `job_id`'s move to `to` under attempt `attempt`: what
    `shared.jobs` calls with every status change it writes."""
    return record_job_event(session, job_id, STATUS_EVENTS[to], attempt=attempt)
