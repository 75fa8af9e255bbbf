"""The Standard Webhooks signature, made with the `standardwebhooks` package: headers
`webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, one `v1,…` per secret, space-separated, which is how a receiver
keeps verifying across a secret rotation."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from standardwebhooks import Webhook


def signed_headers(webhook_id: str, at: datetime, body: str,
                   secrets: Sequence[str]) -> dict[str, str]:
    """The headers that sign `body` as message `webhook_id` sent at `at`, with every one of
    `secrets` (plain `whsec_…` values)."""
    signatures = [Webhook(secret).sign(webhook_id, at, body) for secret in secrets]
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
