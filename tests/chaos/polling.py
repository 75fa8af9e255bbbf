"""Waiting on real processes: poll a condition until it holds, or fail saying what was awaited
and what was seen instead."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """An awaited condition never held; an AssertionError so pytest shows it as a failure."""


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.1,
    on_timeout: Callable[[], object] | None = None,
) -> T:
    """Call `condition` every `interval_s` until it returns something truthy, and return that.

    `on_timeout` describes the state at the deadline (a job row, a log tail) for the message.
    Exceptions from `condition` propagate: a dead process should fail at once, not time out.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            seen = f"; last seen: {on_timeout()}" if on_timeout is not None else ""
            raise WaitTimeout(f"timed out after {timeout_s:.0f} s waiting for {what}{seen}")
        time.sleep(interval_s)
