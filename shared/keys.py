"""API keys: `tun_<prefix>_<secret>`. The prefix finds the row; only a hash of the secret is kept.

The secret has 256 bits of entropy, so a fast hash (SHA-256) is enough: there is nothing to
brute-force, unlike a human password.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import ApiKey, Tenant, utcnow

KEY_SCHEME = "tun"


@dataclass(frozen=True)
class CreatedKey:
    tenant_id: str
    key_id: str
    name: str
    plaintext: str


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split_key(plaintext: str) -> tuple[str, str] | None:
    parts = plaintext.split("_")
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def create_api_key(session: Session, name: str, tenant_name: str | None = None) -> CreatedKey:
    """Create a key (and its tenant, named after the key unless given). Returns the plaintext
    once; it cannot be recovered afterwards."""
    tenant_name = tenant_name or name
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32).replace("_", "-")
    key = ApiKey(tenant_id=tenant.id, name=name, prefix=prefix, secret_hash=_hash_secret(secret))
    session.add(key)
    session.flush()
    return CreatedKey(tenant.id, key.id, name, f"{KEY_SCHEME}_{prefix}_{secret}")


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key matching `plaintext`, or None. Records when it was last used."""
    split = _split_key(plaintext)
    if split is None:
        return None
    prefix, secret = split
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.secret_hash, _hash_secret(secret)):
        return None
    key.last_used_at = utcnow()
    return key


def revoke_api_key(session: Session, prefix: str) -> bool:
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True
