"""Webhook signing secrets: `whsec_` and 24 random bytes in base64, the form both Standard
Webhooks' and OpenAI's verifiers read.

A secret is shown to its tenant once, when it is made (endpoint creation, rotation). Stored,
it is encrypted the way job payload secrets are (`shared.payload_secrets`: Fernet with
`TUNERY_SECRET_KEY`, `enc:v1:` prefix), so the database alone signs nothing; the API and every
worker need the same key. It never goes into a log line or an error message.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.fernet import InvalidToken

from shared.payload_secrets import ENCRYPTED_PREFIX, SecretsUnreadable, payload_cipher
from shared.settings import Settings

PREFIX = "whsec_"
SECRET_BYTES = 24
HINT_CHARS = 4


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def hint(secret: str) -> str:
    """What the API shows of a secret: enough for its owner to tell which one is in use."""
    return f"{PREFIX}…{secret[-HINT_CHARS:]}"


def seal(secret: str, settings: Settings | None = None) -> str:
    """`secret` as stored."""
    return ENCRYPTED_PREFIX + payload_cipher(settings).encrypt(secret.encode()).decode()


def unseal(stored: str, settings: Settings | None = None) -> str:
    """A stored secret in plain text, for signing. Raises `SecretsUnreadable` (which never
    shows the value) when this process's key cannot decrypt it."""
    try:
        return payload_cipher(settings).decrypt(stored.removeprefix(ENCRYPTED_PREFIX)).decode()
    except InvalidToken:
        raise SecretsUnreadable(
            "the endpoint's signing secret cannot be decrypted: it was encrypted with another "
            "TUNERY_SECRET_KEY than this process's; give the API and every worker the same key"
        ) from None
