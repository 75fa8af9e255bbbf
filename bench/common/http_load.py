"""A closed-loop HTTP load generator: a fixed number of asyncio clients, each sending its next
request as soon as the previous one is answered, for a fixed time; latency per request kind.

Latency is measured around `await client.request(...)`, so it includes the time the client's
own event loop needs to notice the answer: on a machine whose cores the server also uses, a
busy client adds to it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

ERROR_SAMPLES = 5


@dataclass
class Tally:
    """What one kind of request got during a phase."""

    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)

    def add(self, latency_s: float, error: str | None = None, detail: str = "") -> None:
        if error is None:
            self.latencies_s.append(latency_s)
            return
        self.errors[error] += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(f"{error}: {detail[:300]}")

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values())


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def summarize(tally: Tally, seconds: float) -> dict[str, Any]:
    ok = sorted(tally.latencies_s)
    ms = {f"p{q}_ms": (None if (v := percentile(ok, q)) is None else v * 1000)
          for q in (50, 95, 99)}
    return {
        "requests": tally.requests,
        "ok": len(ok),
        "errors": sum(tally.errors.values()),
        "errors_by_kind": dict(tally.errors),
        "error_samples": tally.error_samples,
        "seconds": seconds,
        "requests_per_s": tally.requests / seconds if seconds > 0 else None,
        **ms,
        "mean_ms": 1000 * sum(ok) / len(ok) if ok else None,
        "max_ms": 1000 * ok[-1] if ok else None,
    }


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]
"""Sends one request as client number `i`."""


@dataclass(frozen=True)
class Step:
    """One request of a client's loop: what to send, what status means success, where to
    count it, and what to do with a successful answer (remember a job id, say)."""

    name: str
    send: Request
    expect: int
    on_success: Callable[[httpx.Response, int], None] | None = None


async def run_phase(client: httpx.AsyncClient, loop: list[Step], concurrency: int,
                    duration_s: float) -> tuple[dict[str, Tally], float]:
    """`concurrency` clients repeat `loop` until `duration_s` has passed (a request under
    way then is finished and counted). Returns a tally per step name and the phase's
    seconds, from the start to the last answer."""
    tallies: dict[str, Tally] = {step.name: Tally() for step in loop}
    started = time.perf_counter()
    deadline = started + duration_s

    async def one_client(i: int) -> None:
        while time.perf_counter() < deadline:
            for step in loop:
                sent = time.perf_counter()
                try:
                    response = await step.send(client, i)
                except httpx.HTTPError as exc:
                    tallies[step.name].add(time.perf_counter() - sent, type(exc).__name__,
                                           str(exc))
                    break
                latency = time.perf_counter() - sent
                if response.status_code != step.expect:
                    tallies[step.name].add(latency, f"HTTP {response.status_code}",
                                           response.text)
                    break
                tallies[step.name].add(latency)
                if step.on_success is not None:
                    step.on_success(response, i)

    await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    return tallies, time.perf_counter() - started
