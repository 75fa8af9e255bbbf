"""The sender: threads in every worker process that claim due deliveries and send them, and
the claim and record around the API's one-off test send.

Each thread sends one delivery at a time, so a slow endpoint holds up one thread, never the
others; a tenant has at most `TUNERY_WEBHOOK_MAX_IN_FLIGHT_PER_TENANT` deliveries in flight
across all senders, one per endpoint, so its slow receivers never hold them all. Senders in
many workers share the work through the database's claims (`shared.webhooks.deliveries`);
nothing is held in memory between two claims, so a worker that dies loses nothing but the
attempt in flight, which the next claim sends again.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.models import WebhookEndpoint, utcnow
from shared.settings import Settings
from shared.url_guard import redact_url
from shared.webhooks.deliveries import (
    ClaimedDelivery,
    Outcome,
    claim_due,
    claim_test,
    give_up,
    lease_seconds,
    record_outcome,
)
from shared.webhooks.events import SAMPLE_JOB_ID, job_event
from shared.webhooks.send import post_delivery

log = logging.getLogger("tunery.webhooks")


def send_next(settings: Settings, owner: str) -> bool:
    """Claim one due delivery and make its attempt; whether one was due."""
    with session_scope() as session:
        claimed = claim_due(session, owner, lease_seconds(settings.webhooks),
                            settings.webhooks.max_in_flight_per_tenant)
    if claimed is None:
        return False
    if not claimed.endpoint_enabled:
        with session_scope() as session:
            give_up(session, claimed, "not sent: the endpoint was disabled")
        return True
    outcome = post_delivery(claimed, settings)
    with session_scope() as session:
        status = record_outcome(session, claimed, outcome, settings.webhooks)
    _log_attempt(claimed, outcome, status.value if status else "lease lost")
    return True


def claim_test_send(session: Session, endpoint: WebhookEndpoint, event_type: str,
                    settings: Settings, owner: str) -> ClaimedDelivery:
    """A sample `event_type` event for `endpoint`, as a delivery claimed by `owner` for its
    one attempt (`post_delivery`), listed with the others; commits, so that the session
    holds no connection while the attempt waits for its answer."""
    event = job_event(event_type, SAMPLE_JOB_ID, utcnow())
    claimed = claim_test(session, endpoint, event, owner, lease_seconds(settings.webhooks))
    session.commit()
    return claimed


def record_test_send(session: Session, claimed: ClaimedDelivery, outcome: Outcome,
                     settings: Settings) -> None:
    """Write what the test send's attempt brought; commits."""
    status = record_outcome(session, claimed, outcome, settings.webhooks)
    session.commit()
    _log_attempt(claimed, outcome, status.value if status else "lease lost")


def _log_attempt(claimed: ClaimedDelivery, outcome: Outcome, result: str) -> None:
    answer = outcome.status_code if outcome.status_code is not None else outcome.error
    log.info("webhook %s attempt %d to %s: %s in %d ms; %s", claimed.id, claimed.attempt,
             redact_url(claimed.url), answer, outcome.duration_ms, result)


class WebhookSender(threading.Thread):
    """`send_next` until `stop()`, resting `poll_interval_s` whenever nothing is due; a
    database outage is logged and retried, never fatal."""

    def __init__(self, settings: Settings, owner: str) -> None:
        super().__init__(name=f"tunery-webhooks-{owner}", daemon=True)
        self.settings = settings
        self.owner = owner
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                busy = send_next(self.settings, self.owner)
            except Exception as exc:  # noqa: BLE001 - an outage must not end the loop
                log.warning("webhook sender %s failed (will retry): %s", self.owner, exc)
                busy = False
            if not busy and self._stopped.wait(self.settings.webhooks.poll_interval_s):
                return

    def stop(self) -> None:
        self._stopped.set()


def start_senders(settings: Settings, identity: str) -> list[WebhookSender]:
    """`settings.webhooks.sender_threads` senders, started, owned by `identity` (the
    process) and their number."""
    senders = [WebhookSender(settings, f"{identity}/{n}")
               for n in range(settings.webhooks.sender_threads)]
    for sender in senders:
        sender.start()
    return senders
