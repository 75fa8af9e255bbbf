"""Deliveries in the database: claiming a due one under a lease, recording what an attempt
brought, listing attempts.

A claim is one transaction: pick the oldest due delivery (`FOR UPDATE SKIP LOCKED` on
PostgreSQL, so concurrent senders pick different rows instead of queueing on one), then take
it with an UPDATE fenced on its being due and unleased (what keeps two senders apart on
SQLite, which locks the whole database for the writer instead), count the attempt, and write
the attempt's row. The lease outlasts the longest attempt (`lease_seconds`), so while it
holds nobody else sends that delivery; a sender that dies leaves the lease to expire, and the
next claim sends the delivery again, with the same id, and marks the lost attempt.

A claim shares the senders out between tenants (`_fair_share`): a tenant whose receivers
accept connections and never answer would otherwise hold every sender for a whole deadline per
attempt, and, its deliveries being due first, keep every other tenant's waiting.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, aliased

from shared.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    as_utc,
    utcnow,
)
from shared.settings import WebhookSettings
from shared.tenancy import CursorNotFound
from shared.webhooks.endpoints import disable
from shared.webhooks.events import Event
from shared.webhooks.outbox import new_delivery_id

LOST = "no outcome recorded: the sender stopped during the attempt (its lease expired)"
MAX_ERROR_CHARS = 500
# Time for the database writes around an attempt, beyond the attempt's own deadline.
LEASE_MARGIN_S = 10.0


def lease_seconds(settings: WebhookSettings) -> float:
    return settings.timeout_s + LEASE_MARGIN_S


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery a sender holds for one attempt."""

    id: str
    endpoint_id: str
    url: str
    body: str
    attempt: int
    attempt_id: str
    owner: str
    is_test: bool
    created_at: datetime
    stored_secrets: tuple[str, ...]
    """The encrypted secrets to sign with: the current one, and the previous one while its
    rotation window lasts."""
    endpoint_enabled: bool


@dataclass(frozen=True)
class Outcome:
    """What one attempt brought: the answer's status code, or why there was none."""

    duration_ms: int
    status_code: int | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        return self.status_code == 410


def _due(now: datetime) -> ColumnElement[bool]:
    return and_(WebhookDelivery.status == DeliveryStatus.PENDING.value,
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.lease_expires_at.is_(None),
                    WebhookDelivery.lease_expires_at < now))


def _fair_share(now: datetime, max_in_flight_per_tenant: int) -> ColumnElement[bool]:
    """Whether a delivery may be sent now beside those in flight (leased by a sender, the
    lease not expired): its tenant has fewer than `max_in_flight_per_tenant` of them, and its
    endpoint none.

    A slow receiver of one tenant must not hold every sender: with a cap per tenant the other
    tenants' deliveries find a sender free, however many of the first tenant's are due ahead
    of them; with one per endpoint a tenant's slow endpoint leaves its other endpoints a slot.
    The sets of busy endpoints and full tenants are subqueries of their own, not correlated
    with the candidate row, so the database works them out once per claim, from the few
    leased rows, instead of once per due delivery it passes on the way to a claimable one.
    """
    leased = aliased(WebhookDelivery)
    in_flight = and_(leased.status == DeliveryStatus.PENDING.value,
                     leased.is_test.is_(False), leased.lease_expires_at >= now)
    busy_endpoints = select(leased.endpoint_id).where(in_flight)
    owner = aliased(WebhookEndpoint)
    full_tenants = (
        select(owner.tenant_id).join(leased, leased.endpoint_id == owner.id).where(in_flight)
        .group_by(owner.tenant_id).having(func.count() >= max_in_flight_per_tenant)
    )
    endpoints_of_full_tenants = select(WebhookEndpoint.id).where(
        WebhookEndpoint.tenant_id.in_(full_tenants))
    return and_(WebhookDelivery.endpoint_id.not_in(busy_endpoints),
                WebhookDelivery.endpoint_id.not_in(endpoints_of_full_tenants))


def claim_due(session: Session, owner: str, lease_s: float,
              max_in_flight_per_tenant: int) -> ClaimedDelivery | None:
    """Take the oldest due delivery for one attempt, or None when none is due whose tenant
    has fewer than `max_in_flight_per_tenant` in flight and whose endpoint has none
    (`_fair_share`). The caller commits before it sends.

    The share is checked again in the UPDATE that takes the delivery, so on SQLite, whose
    writers take turns, it holds exactly. On PostgreSQL claims that run at once do not see
    each other's leases before they commit, so a tenant may get one delivery more than its
    share for each other sender claiming at the same moment: a small over-claim, accepted
    to keep claims lock-free (SKIP LOCKED) instead of serialising them on a tenant lock.
    """
    now = utcnow()
    due = and_(_due(now), WebhookDelivery.is_test.is_(False),
               _fair_share(now, max_in_flight_per_tenant))
    delivery_id = session.scalar(
        select(WebhookDelivery.id).where(due).order_by(WebhookDelivery.next_attempt_at)
        .limit(1).with_for_update(skip_locked=True)
    )
    if delivery_id is None:
        return None
    return _take(session, delivery_id, owner, lease_s, now, due)


def claim_test(session: Session, endpoint: WebhookEndpoint, event: Event, owner: str,
               lease_s: float) -> ClaimedDelivery:
    """A test delivery of `event` to `endpoint`, taken at once by `owner` for its one
    attempt; recorded like any other, never retried."""
    now = utcnow()
    delivery_id = new_delivery_id()
    session.execute(insert(WebhookDelivery).values(
        id=delivery_id, endpoint_id=endpoint.id, event_id=event.id, event_type=event.type,
        body=event.body, status=DeliveryStatus.PENDING.value, is_test=True, attempts=0,
        next_attempt_at=now, created_at=now))
    claimed = _take(session, delivery_id, owner, lease_s, now, _due(now))
    assert claimed is not None  # nobody else claims a test delivery
    return claimed


def _take(session: Session, delivery_id: str, owner: str, lease_s: float, now: datetime,
          fence: ColumnElement[bool]) -> ClaimedDelivery | None:
    taken = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, fence)
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
                attempts=WebhookDelivery.attempts + 1)
        .returning(WebhookDelivery.attempts, WebhookDelivery.endpoint_id, WebhookDelivery.body,
                   WebhookDelivery.is_test, WebhookDelivery.created_at),
        execution_options={"synchronize_session": False},
    ).one_or_none()
    if taken is None:
        return None  # another sender took it between the pick and the update
    attempt, endpoint_id, body, is_test, created_at = taken
    session.execute(
        update(WebhookAttempt)
        .where(WebhookAttempt.delivery_id == delivery_id, WebhookAttempt.finished_at.is_(None))
        .values(finished_at=now, error=LOST),
        execution_options={"synchronize_session": False},
    )
    attempt_id = f"wha_{uuid.uuid4().hex}"
    session.execute(insert(WebhookAttempt).values(
        id=attempt_id, delivery_id=delivery_id, endpoint_id=endpoint_id, number=attempt,
        started_at=now))
    url, secret, previous, enabled = session.execute(
        select(WebhookEndpoint.url, WebhookEndpoint.secret,
               case((WebhookEndpoint.previous_secret_expires_at > now,
                     WebhookEndpoint.previous_secret), else_=None),
               WebhookEndpoint.disabled_at.is_(None))
        .where(WebhookEndpoint.id == endpoint_id)
    ).one()
    return ClaimedDelivery(
        id=delivery_id, endpoint_id=endpoint_id, url=url, body=body, attempt=attempt,
        attempt_id=attempt_id, owner=owner, is_test=bool(is_test),
        created_at=as_utc(created_at), stored_secrets=(secret, previous) if previous
        else (secret,), endpoint_enabled=bool(enabled),
    )


def backoff_s(attempt: int, settings: WebhookSettings,
              rng: random.Random | None = None) -> float:
    """How long to wait after failed attempt number `attempt` (from 1): exponential backoff
    with full jitter, anywhere from 0 to base * 2^(attempt-1), at most the longest interval,
    so that many deliveries failing at once do not all come back at the same moment."""
    ceiling = min(settings.retry_max_interval_s,
                  settings.retry_base_s * 2.0 ** min(attempt - 1, 62))
    return (rng or random).uniform(0.0, ceiling)


def record_outcome(session: Session, claimed: ClaimedDelivery, outcome: Outcome,
                   settings: WebhookSettings) -> DeliveryStatus | None:
    """Write the attempt's outcome and move the delivery on: delivered on a 2xx; on a 410
    failed, and its endpoint disabled; otherwise due again after `backoff_s`, or failed once
    that would pass the retry window (a test delivery fails at once). Returns the delivery's
    status, or None when the claim's lease was lost to another sender meanwhile."""
    now = utcnow()
    error = outcome.error[:MAX_ERROR_CHARS] if outcome.error else None
    session.execute(
        update(WebhookAttempt).where(WebhookAttempt.id == claimed.attempt_id)
        .values(finished_at=now, duration_ms=outcome.duration_ms,
                status_code=outcome.status_code, error=error),
        execution_options={"synchronize_session": False},
    )
    values: dict[str, object] = {"lease_owner": None, "lease_expires_at": None}
    if outcome.delivered:
        status = DeliveryStatus.DELIVERED
    elif outcome.gone or claimed.is_test:
        status = DeliveryStatus.FAILED
    else:
        next_at = now + timedelta(seconds=backoff_s(claimed.attempt, settings))
        deadline = claimed.created_at + timedelta(seconds=settings.retry_window_s)
        status = DeliveryStatus.PENDING if next_at <= deadline else DeliveryStatus.FAILED
        values["next_attempt_at"] = next_at
    values["status"] = status.value
    if status is not DeliveryStatus.PENDING:
        values["finished_at"] = now
    moved = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claimed.id,
               WebhookDelivery.status == DeliveryStatus.PENDING.value,
               WebhookDelivery.lease_owner == claimed.owner,
               WebhookDelivery.attempts == claimed.attempt)
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        return None
    if outcome.gone and not claimed.is_test:
        endpoint = session.get(WebhookEndpoint, claimed.endpoint_id)
        if endpoint is not None and endpoint.disabled_at is None:
            disable(session, endpoint, f"the endpoint answered 410 Gone on {now:%Y-%m-%d %H:%M} "
                                       "UTC; enable it again to resume deliveries")
    return status


def give_up(session: Session, claimed: ClaimedDelivery, reason: str) -> None:
    """End a claimed delivery without sending it (its endpoint was disabled meanwhile)."""
    now = utcnow()
    session.execute(
        update(WebhookAttempt).where(WebhookAttempt.id == claimed.attempt_id)
        .values(finished_at=now, duration_ms=0, error=reason),
        execution_options={"synchronize_session": False},
    )
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claimed.id, WebhookDelivery.lease_owner == claimed.owner,
               WebhookDelivery.attempts == claimed.attempt)
        .values(status=DeliveryStatus.FAILED.value, finished_at=now, lease_owner=None,
                lease_expires_at=None),
        execution_options={"synchronize_session": False},
    )


def prune_finished(session: Session, keep_days: int) -> int:
    """Forget deliveries delivered or given up more than `keep_days` ago, with their
    attempts; how many."""
    cutoff = utcnow() - timedelta(days=keep_days)
    pruned = session.execute(
        delete(WebhookDelivery)
        .where(WebhookDelivery.status != DeliveryStatus.PENDING.value,
               WebhookDelivery.finished_at < cutoff),
        execution_options={"synchronize_session": False},
    )
    return int(pruned.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AttemptView:
    """An attempt with the delivery it belongs to, as the API lists them."""

    attempt: WebhookAttempt
    event_id: str
    event_type: str
    delivery_status: str
    is_test: bool


def list_attempts(session: Session, endpoint_id: str, *, after_id: str | None,
                  limit: int) -> tuple[list[AttemptView], bool]:
    """A page of the endpoint's attempts, newest first, after the attempt `after_id`, and
    whether more follow; `CursorNotFound` when `after_id` is no attempt of the endpoint."""
    where: list[ColumnElement[bool]] = [WebhookAttempt.endpoint_id == endpoint_id]
    if after_id is not None:
        cursor = session.execute(
            select(WebhookAttempt.started_at, WebhookAttempt.id)
            .where(WebhookAttempt.id == after_id, WebhookAttempt.endpoint_id == endpoint_id)
        ).one_or_none()
        if cursor is None:
            raise CursorNotFound(after_id)
        where.append(tuple_(WebhookAttempt.started_at, WebhookAttempt.id) < tuple_(*cursor))
    rows = session.execute(
        select(WebhookAttempt, WebhookDelivery.event_id, WebhookDelivery.event_type,
               WebhookDelivery.status, WebhookDelivery.is_test)
        .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
        .where(*where)
        .order_by(WebhookAttempt.started_at.desc(), WebhookAttempt.id.desc())
        .limit(limit + 1)
    ).all()
    views = [AttemptView(attempt, event_id, event_type, status, bool(is_test))
             for attempt, event_id, event_type, status, is_test in rows[:limit]]
    return views, len(rows) > limit
