"""`Idempotency-Key` on job submission and dataset uploads: a retried POST replays the first
response.

A key belongs to one API key and lives `idempotency_ttl_s`. The record is inserted in the same
transaction as the job it answers for, so one never exists without the other, and the unique
constraint on (api_key_id, key) decides which of several concurrent retries keeps its job: the
others meet the winner's record, roll their job back and replay the winner's response. This
works the same on PostgreSQL (the second insert waits for the first to commit) and SQLite
(writers take turns on the database lock).

Both statements are on the API's busiest write path: Core statements built once, with their
values bound at execution (building a statement and going through the ORM cost several times
what the database spends running it), and the record is one upsert that also replaces an
expired record (see `KeyedRequest.record`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Executable, Table, bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.models import IdempotencyKey, utcnow

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")
_KEYS: Table = IdempotencyKey.__table__  # type: ignore[assignment]
_LOOKUP = select(_KEYS.c.request_hash, _KEYS.c.response_status, _KEYS.c.response_body).where(
    _KEYS.c.api_key_id == bindparam("api_key_id"),
    _KEYS.c.key == bindparam("key"),
    _KEYS.c.created_at >= bindparam("live_since"),
)


class IdempotencyKeyRejected(Exception):
    """The header cannot be honoured: malformed, or reused with a different body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class IdempotencyRaceLost(Exception):
    """A concurrent request held the key, and its record vanished before it could be read."""


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


def upload_hash(sha256: str, size: int, filename: str | None, form: dict[str, str]) -> str:
    """SHA-256 of an uploaded file's identity: its bytes' SHA-256 (hashed as they streamed
    in), its size, its name and the form fields sent with it, as canonical JSON."""
    canonical = json.dumps({"sha256": sha256, "size": size, "filename": filename, "form": form},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_hash(request: BaseModel) -> str:
    """SHA-256 of the validated request as canonical JSON: key order and whitespace in the
    body the client sent make no difference, and defaults count as if sent."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class KeyedRequest:
    """One submission under an idempotency key, scoped to the API key that sent it."""

    api_key_id: str
    key: str
    request_hash: str
    ttl_s: int

    def earlier_response(self, session: Session) -> StoredResponse | None:
        """The response stored for this key within the TTL, or None.

        Raises IdempotencyKeyRejected if that response answered a different body.
        """
        record = session.execute(_LOOKUP, {
            "api_key_id": self.api_key_id, "key": self.key,
            "live_since": utcnow() - timedelta(seconds=self.ttl_s),
        }).first()
        if record is None:
            return None
        request_hash, status, body = record
        if request_hash != self.request_hash:
            raise IdempotencyKeyRejected(
                "idempotency_key_reused",
                f"{HEADER} {self.key!r} was already used with a different request body; "
                "send a new key for a new request",
            )
        return StoredResponse(status, body)

    def record(self, session: Session, response: StoredResponse, *, job_id: str | None = None,
               dataset_id: str | None = None) -> StoredResponse | None:
        """Store `response` for this key in the session's open transaction, beside the job or
        the dataset it answers for.

        Returns None when stored: the caller commits. When a concurrent request with the same
        key committed first, the session is rolled back (this request's job with it) and that
        request's response is returned instead.

        One statement: an INSERT that, when the key already has a record, overwrites it only
        if it expired (an expired record no longer answers for the key). A live record, a
        concurrent request's that committed first included (PostgreSQL makes the INSERT wait
        for it), is left alone and the statement returns no row.
        """
        now = utcnow()
        stored = session.execute(_record_statement(session.get_bind().dialect.name), {
            "api_key_id": self.api_key_id, "key": self.key, "request_hash": self.request_hash,
            "job_id": job_id, "dataset_id": dataset_id, "response_status": response.status,
            "response_body": response.body, "created_at": now,
            "live_since": now - timedelta(seconds=self.ttl_s),
        }).first()
        if stored is not None:
            return None
        session.rollback()
        earlier = self.earlier_response(session)
        if earlier is None:  # the winner's record vanished (its job was deleted): rare
            raise IdempotencyRaceLost(
                f"{HEADER} {self.key!r}: a concurrent request's record was gone before it "
                "could be replayed"
            )
        return earlier


@cache
def _record_statement(dialect: str) -> Executable:
    """INSERT a record; over an existing record of the key only if it expired (created
    before `live_since`); RETURNING a row only when it wrote.

    PostgreSQL and SQLite, the databases Tunery runs on, spell the upsert alike; SQLAlchemy
    has one construct per dialect.
    """
    insert: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        insert = postgresql.insert(_KEYS)
    elif dialect == "sqlite":
        insert = sqlite.insert(_KEYS)
    else:
        raise NotImplementedError(f"idempotency keys need PostgreSQL or SQLite, not {dialect}")
    replaced = ("request_hash", "job_id", "dataset_id", "response_status", "response_body",
                "created_at")
    return insert.on_conflict_do_update(
        index_elements=[_KEYS.c.api_key_id, _KEYS.c.key],
        set_={name: insert.excluded[name] for name in replaced},
        where=_KEYS.c.created_at < bindparam("live_since"),
    ).returning(_KEYS.c.id)


def delete_expired(session: Session, ttl_s: int) -> int:
    """Forget keys older than the TTL (the maintenance sweep calls this); returns how many."""
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def keyed_request(api_key_id: str, header: str | None, request: BaseModel | str,
                  ttl_s: int) -> KeyedRequest | None:
    """The submission's idempotency scope, or None when no header was sent. `request` is the
    validated request, or the hash of an upload (`upload_hash`).

    Raises IdempotencyKeyRejected unless the key is 1 to 255 printable ASCII characters.
    """
    if header is None:
        return None
    if not 1 <= len(header) <= MAX_KEY_LENGTH or not _PRINTABLE_ASCII.fullmatch(header):
        raise IdempotencyKeyRejected(
            "invalid_request",
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    hashed = request if isinstance(request, str) else request_hash(request)
    return KeyedRequest(api_key_id, header, hashed, ttl_s)
