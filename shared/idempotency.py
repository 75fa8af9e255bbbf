"""`Idempotency-Key` on job submission: a retried POST replays the first response.

A key belongs to one API key and lives `idempotency_ttl_s`. The record is inserted in the same
transaction as the job it answers for, so one never exists without the other, and the unique
constraint on (api_key_id, key) decides which of several concurrent retries keeps its job: the
others hit the constraint, roll their job back and replay the winner's response. This works
the same on PostgreSQL (the second insert waits for the first to commit) and SQLite (writers
take turns on the database lock).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import IdempotencyKey, utcnow

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")


class IdempotencyKeyRejected(Exception):
    """The header cannot be honoured: malformed, or reused with a different body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


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
        cutoff = utcnow() - timedelta(seconds=self.ttl_s)
        record = session.scalar(select(IdempotencyKey).where(
            IdempotencyKey.api_key_id == self.api_key_id,
            IdempotencyKey.key == self.key,
            IdempotencyKey.created_at >= cutoff,
        ))
        if record is None:
            return None
        if record.request_hash != self.request_hash:
            raise IdempotencyKeyRejected(
                "idempotency_key_reused",
                f"{HEADER} {self.key!r} was already used with a different request body; "
                "send a new key for a new job",
            )
        return StoredResponse(record.response_status, record.response_body)

    def record(self, session: Session, job_id: str,
               response: StoredResponse) -> StoredResponse | None:
        """Store `response` for this key in the session's open transaction, beside the job.

        Returns None when stored: the caller commits. When a concurrent request with the same
        key committed first, the session is rolled back (this request's job with it) and that
        request's response is returned instead.
        """
        # An expired record no longer answers for the key; the created_at condition keeps a
        # concurrent request's fresh record safe.
        cutoff = utcnow() - timedelta(seconds=self.ttl_s)
        session.execute(delete(IdempotencyKey).where(
            IdempotencyKey.api_key_id == self.api_key_id,
            IdempotencyKey.key == self.key,
            IdempotencyKey.created_at < cutoff,
        ))
        session.add(IdempotencyKey(
            api_key_id=self.api_key_id, key=self.key, request_hash=self.request_hash,
            job_id=job_id, response_status=response.status, response_body=response.body,
        ))
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            earlier = self.earlier_response(session)
            if earlier is None:  # the winner's record vanished (its job was deleted): rare
                raise
            return earlier
        return None


def delete_expired(session: Session, ttl_s: int) -> int:
    """Forget keys older than the TTL (the maintenance sweep calls this); returns how many."""
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def keyed_request(api_key_id: str, header: str | None, request: BaseModel,
                  ttl_s: int) -> KeyedRequest | None:
    """The submission's idempotency scope, or None when no header was sent.

    Raises IdempotencyKeyRejected unless the key is 1 to 255 printable ASCII characters.
    """
    if header is None:
        return None
    if not 1 <= len(header) <= MAX_KEY_LENGTH or not _PRINTABLE_ASCII.fullmatch(header):
        raise IdempotencyKeyRejected(
            "invalid_request",
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    return KeyedRequest(api_key_id, header, request_hash(request), ttl_s)
