"""API keys: `tun_<prefix>_<secret>`. The prefix finds the row; only a hash of the secret is kept.

The secret has 256 bits of entropy, so a fast hash (SHA-256) is enough: there is nothing to
brute-force, unlike a human password.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from shared.models import ApiKey, KeyRole, Tenant, utcnow

KEY_SCHEME = "tun"
# last_used_at is kept to the minute: finer would cost a write on every request.
LAST_USED_RESOLUTION_S = 60


@dataclass(frozen=True)
class CreatedKey:
    tenant_id: str
    key_id: str
    name: str
    plaintext: str
    role: KeyRole = KeyRole.MEMBER


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split_key(plaintext: str) -> tuple[str, str] | None:
    parts = plaintext.split("_")
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def create_api_key(session: Session, name: str, tenant_name: str | None = None, *,
                   admin: bool = False) -> CreatedKey:
    """Create a key (and its tenant, named after the key unless given). Returns the plaintext
    once; it cannot be recovered afterwards. An `admin` key sees every tenant's jobs and
    datasets (for operators); its own submissions still belong to its tenant."""
    tenant_name = tenant_name or name
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32).replace("_", "-")
    role = KeyRole.ADMIN if admin else KeyRole.MEMBER
    key = ApiKey(tenant_id=tenant.id, name=name, prefix=prefix, secret_hash=_hash_secret(secret),
                 role=role.value)
    session.add(key)
    session.flush()
    return CreatedKey(tenant.id, key.id, name, f"{KEY_SCHEME}_{prefix}_{secret}", role)


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key matching `plaintext`, or None. Writes nothing: see `record_use`."""
    split = _split_key(plaintext)
    if split is None:
        return None
    prefix, secret = split
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.secret_hash, _hash_secret(secret)):
        return None
    return key


def record_use(session: Session, key: ApiKey) -> bool:
    """Set the key's `last_used_at` to now, unless it was set less than
    `LAST_USED_RESOLUTION_S` ago; True when it ran the UPDATE: the caller commits, which also
    ends the write transaction when a concurrent request wrote first and this one changed
    nothing (on SQLite an open write transaction locks the database for everyone).

    Most requests write nothing, so reads stay reads: no lock, no WAL growth, no contention
    on the key's row between concurrent requests. The UPDATE is conditional, so concurrent
    requests that all saw an old value write it once.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=LAST_USED_RESOLUTION_S)
    last = key.last_used_at
    if last is not None and (last if last.tzinfo else last.replace(tzinfo=UTC)) >= cutoff:
        return False
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id,
               or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < cutoff))
        .values(last_used_at=now),
        execution_options={"synchronize_session": False},
    )
    return True


@dataclass(frozen=True)
class KeyListing:
    """What `tunery keys list` shows of a key: everything but its secret (only a hash of it is
    kept anyway)."""

    key_id: str
    prefix: str
    name: str
    role: str
    tenant: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def list_api_keys(session: Session) -> list[KeyListing]:
    """Every key, revoked ones included, oldest first."""
    rows = session.execute(
        select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
        .order_by(ApiKey.created_at, ApiKey.id)
    ).all()
    return [KeyListing(key.id, key.prefix, key.name, key.role, tenant, key.created_at,
                       key.last_used_at, key.revoked_at) for key, tenant in rows]


def find_api_key(session: Session, ref: str) -> ApiKey | None:
    """The key `ref` names: its id (as `tunery keys list` shows it), its prefix, or the whole
    key (`tun_<prefix>_<secret>`, found by its prefix)."""
    ref = ref.strip()
    split = _split_key(ref)
    prefix = split[0] if split else ref
    return session.scalar(select(ApiKey).where(or_(ApiKey.id == ref, ApiKey.prefix == prefix)))


def revoke_api_key(session: Session, key: ApiKey) -> bool:
    """Revoke `key` from now on; False when it was revoked already."""
    if key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True
