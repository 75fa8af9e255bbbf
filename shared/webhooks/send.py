"""One attempt at a delivery: sign the stored body, POST it to the endpoint through the
pinned client, and say what came of it.

The URL passes the SSRF rules again here, and the connection goes only to the addresses
checked (`shared.pinned_http`): an endpoint's DNS may point elsewhere since it was created.
Redirects are not followed: a 3xx is an answer that is not a 2xx. The whole attempt has one
deadline, `TUNERY_WEBHOOK_TIMEOUT_S`. The response's body is never read.

Whatever goes wrong in an attempt, even inside Tunery, is that attempt's failure: a delivery
whose attempt raised would keep its lease until it expired and be claimed again and again,
ahead of every other tenant's deliveries, instead of backing off and being given up.
"""

from __future__ import annotations

import logging
import time

import httpx

from shared.models import utcnow
from shared.payload_secrets import SecretsUnreadable
from shared.pinned_http import pinned_client
from shared.settings import Settings
from shared.url_guard import UrlPolicy, UrlRefused, check_url
from shared.webhooks import signing_secrets
from shared.webhooks.deliveries import ClaimedDelivery, Outcome
from shared.webhooks.signing import signed_headers

USER_AGENT = "Tunery-Webhooks/1"
# What the attempt's record says when Tunery itself failed; the details are in the log.
INTERNAL_FAILURE = "the attempt failed inside Tunery; the sender's log has the details"

log = logging.getLogger("tunery.webhooks")


def post_delivery(claimed: ClaimedDelivery, settings: Settings) -> Outcome:
    """Send `claimed`'s attempt and say what came of it; never raises."""
    started = time.monotonic()
    try:
        return _post(claimed, settings, started)
    except Exception:  # noqa: BLE001 - recorded as the attempt's failure, then retried
        log.exception("webhook %s attempt %d failed inside Tunery", claimed.id, claimed.attempt)
        return Outcome(round((time.monotonic() - started) * 1000), error=INTERNAL_FAILURE)


def _post(claimed: ClaimedDelivery, settings: Settings, started: float) -> Outcome:
    def outcome(status_code: int | None = None, error: str | None = None) -> Outcome:
        return Outcome(round((time.monotonic() - started) * 1000), status_code, error)

    try:
        secrets = [signing_secrets.unseal(stored, settings) for stored in claimed.stored_secrets]
    except SecretsUnreadable as exc:
        return outcome(error=str(exc))
    policy = UrlPolicy.from_settings(settings.sources)
    timeout_s = settings.webhooks.timeout_s
    headers = {"content-type": "application/json", "user-agent": USER_AGENT,
               **signed_headers(claimed.id, utcnow(), claimed.body, secrets)}
    try:
        check_url(claimed.url, policy)
        with pinned_client(policy, timeout=httpx.Timeout(timeout_s), deadline_s=timeout_s
                           ) as client, client.stream("POST", claimed.url,
                                                      content=claimed.body.encode(),
                                                      headers=headers) as response:
            return outcome(status_code=response.status_code)
    except UrlRefused as exc:
        return outcome(error=f"refused: {exc}")
    except httpx.TimeoutException:
        return outcome(error=f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return outcome(error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
