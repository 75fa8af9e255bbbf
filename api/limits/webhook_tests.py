"""Where the API's webhook test sends run, and how many may run at once.

A test send waits for the tenant's endpoint for up to the attempt deadline. On the threads
that serve every other request, many of them at once would make every tenant wait; they run
instead on a few threads of their own (`SEND_THREADS`), and each endpoint may have one test
send in flight, each tenant `MAX_PER_TENANT`: beyond that, 429 with Retry-After. The counts
are this process's; every API process has its own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import anyio
import anyio.to_thread

from api.errors import ApiError

SEND_THREADS = 4
MAX_PER_TENANT = 2

T = TypeVar("T")


class WebhookTestSends:
    """The test sends in flight in this process, by tenant and by endpoint; used from the
    event loop only, so the counts need no lock."""

    def __init__(self, threads: int = SEND_THREADS, per_tenant: int = MAX_PER_TENANT) -> None:
        self.threads = threads
        self.per_tenant = per_tenant
        self.endpoints: set[tuple[str, str]] = set()
        self.tenants: Counter[str] = Counter()
        # Made in the event loop that uses it, at the first send.
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        return self._limiter

    @contextmanager
    def hold(self, tenant_id: str, endpoint_id: str, retry_after_s: float) -> Iterator[None]:
        """A place for one test send of `tenant_id` to `endpoint_id`, for the `with` block;
        429 when the endpoint or the tenant has no place left."""
        retry = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
        # By tenant too: another tenant naming this endpoint's id must not take its place.
        key = (tenant_id, endpoint_id)
        if key in self.endpoints:
            raise ApiError(429, "webhook_test_in_flight",
                           "a test send to this endpoint is still waiting for its answer; "
                           "retry once it is over", headers=retry)
        if self.tenants[tenant_id] >= self.per_tenant:
            raise ApiError(429, "webhook_test_in_flight",
                           f"at most {self.per_tenant} test sends of one tenant at once; retry "
                           "once one is over", headers=retry)
        self.endpoints.add(key)
        self.tenants[tenant_id] += 1
        try:
            yield
        finally:
            self.endpoints.discard(key)
            self.tenants[tenant_id] -= 1
            if not self.tenants[tenant_id]:
                del self.tenants[tenant_id]

    async def run(self, send: Callable[..., T], *args: object) -> T:
        """`send(*args)` on the test sends' own threads."""
        return await anyio.to_thread.run_sync(send, *args, limiter=self.limiter)
