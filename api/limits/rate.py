"""Per-API-key request rate: a token bucket per key, kept in this API process.

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
    """`per_minute` requests per key per minute, in bursts of up to `per_minute`; 0: no limit.

    One bucket per key id: the number of buckets is bounded by the keys in the database, and a
    full bucket behaves as a missing one, so none is ever evicted.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self._buckets: dict[str, _Bucket] = {}
        # Sync routes resolve dependencies in worker threads.
        self._lock = threading.Lock()

    def retry_after(self, key_id: str) -> int | None:
        """Take one request from `key_id`'s bucket: None if allowed, else the whole seconds
        until the next request would be."""
        if self.per_minute <= 0:
            return None
        rate = self.per_minute / 60.0
        with self._lock:
            now = self.clock()
            bucket = self._buckets.setdefault(key_id, _Bucket(float(self.per_minute), now))
            bucket.tokens = min(float(self.per_minute),
                                bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - bucket.tokens) / rate))
