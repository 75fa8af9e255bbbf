"""Per-API-key request rate: token buckets per key, kept in this API process.

Each key has two budgets. Reads of one job that a client polls while following it (its
status, logs, metrics, events, stream, and the file it trains on) draw from the job-reads
budget; every other request, submits and all writes among them, from the general one. A client
polling a job twice a second for its status and its logs thus never uses up what it needs to
submit or cancel, and a burst of submits is refused at the general rate however fast the
reads are allowed.

In-process rather than in Redis: the embedded stack has no Redis, the check costs no network
round trip, and the limit guards the service against one runaway client, not a billing quota.
The cost is that N API replicas together allow N times `rate_limit_per_minute`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`per_minute` requests per key per minute, in bursts of up to `per_minute`, and apart
    from them `read_per_minute` job reads; 0 for `per_minute`: no limit at all, 0 for
    `read_per_minute`: no limit on job reads.

    One bucket per key id and budget: the number of buckets is bounded by the keys in the
    database, and a full bucket behaves as a missing one, so none is ever evicted.
    """

    def __init__(self, per_minute: int, read_per_minute: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.read_per_minute, self.clock = per_minute, read_per_minute, clock
        self._buckets: dict[tuple[str, bool], _Bucket] = {}
        # Sync routes resolve dependencies in worker threads.
        self._lock = threading.Lock()

    def limit(self, *, job_read: bool = False) -> int:
        """Requests per minute of the budget a request draws from; 0: not limited."""
        if self.per_minute <= 0:
            return 0
        return self.read_per_minute if job_read else self.per_minute

    def retry_after(self, key_id: str, *, job_read: bool = False) -> int | None:
        """Take one request from `key_id`'s bucket (its job-reads one for a `job_read`): None
        if allowed, else the whole seconds until the next request would be."""
        per_minute = self.limit(job_read=job_read)
        if per_minute <= 0:
            return None
        rate = per_minute / 60.0
        with self._lock:
            now = self.clock()
            bucket = self._buckets.setdefault((key_id, job_read),
                                              _Bucket(float(per_minute), now))
            bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - bucket.tokens) / rate))
