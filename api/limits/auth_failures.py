"""Failed authentications per client address: a token bucket of failures, in this API process.

Guessing API keys or upload tokens costs an attacker one request per guess; without a limit
the server answers guesses as fast as it can. Each client address may fail
`auth_failures_per_minute` times a minute (in bursts of as many); past that, a request from it
that fails again gets 429 with Retry-After instead of 401/403, until the budget refills.

Only failures are counted and only failures are refused: a request with a valid key is served
whatever its address's budget says, so the clients behind one shared address (a NAT, an
office proxy) are not locked out by one of them guessing.

The address is the connection's peer as the ASGI server reports it (`request.client.host`).
Behind a reverse proxy that is the proxy's address, unless uvicorn is told to trust it
(`--forwarded-allow-ips`; uvicorn trusts 127.0.0.1 by default), in which case it rewrites the
address from X-Forwarded-For. In-process, like the request rate limiter: N API replicas allow
N times the budget.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from fastapi import Request

from api.errors import ApiError

# Addresses tracked at once. A full bucket behaves as a missing one, and the least recently
# failing address is the first dropped beyond this: memory stays bounded however many
# addresses a client fails from.
MAX_TRACKED_ADDRESSES = 10_000


class FailedAuthLimiter:
    """`per_minute` failed attempts per client address per minute; 0: no limit."""

    def __init__(self, per_minute: int, *, max_addresses: int = MAX_TRACKED_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.max_addresses, self.clock = per_minute, max_addresses, clock
        # address -> (tokens, updated); ordered from the least to the most recently failing.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()  # sync dependencies run in worker threads

    def failed(self, address: str) -> int | None:
        """Count one failed attempt from `address`: None while it is within its budget, else
        the whole seconds until its next failure would be."""
        if self.per_minute <= 0:
            return None
        burst, rate = float(self.per_minute), self.per_minute / 60.0
        with self._lock:
            now = self.clock()
            tokens, updated = self._buckets.pop(address, (burst, now))
            tokens = min(burst, tokens + (now - updated) * rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[address] = (tokens, now)
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
            if allowed:
                return None
            return max(1, math.ceil((1.0 - tokens) / rate))

    def tracked(self) -> int:
        """How many addresses have a bucket (tests: the memory bound)."""
        with self._lock:
            return len(self._buckets)


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def refuse_if_over(request: Request, what: str) -> None:
    """Count a failed attempt of `request`'s client; 429 with Retry-After if that puts its
    address over the budget. Call it where the request is about to get its 401/403."""
    limiter: FailedAuthLimiter | None = getattr(request.app.state, "auth_failure_limiter", None)
    if limiter is None:
        return
    wait = limiter.failed(client_address(request))
    if wait is not None:
        raise ApiError(429, "too_many_failed_attempts",
                       f"too many failed {what} from this address: at most "
                       f"{limiter.per_minute} per minute; retry in {wait} s",
                       headers={"Retry-After": str(wait)})

