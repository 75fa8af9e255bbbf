"""A burst of concurrent requests, more than the API's threads and its database connections
together, through a real uvicorn server: every request is answered, none waits out the
connection pool's timeout."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import new_key

# Starlette runs sync routes and dependencies on 40 threads; the pool holds 15 connections.
BURST = 200


@pytest.fixture(autouse=True)
def no_rate_limit(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before `served` makes the app, whose rate limiter reads it once.
    monkeypatch.setenv("TUNERY_RATE_LIMIT_PER_MINUTE", "0")


def test_a_burst_larger_than_threads_and_connections_together_is_all_answered(
        served: tuple[str, Callable[[], int]]) -> None:
    base_url, checked_out = served
    headers = {"Authorization": f"Bearer {new_key('burst')}"}
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    with httpx.Client(base_url=base_url, headers=headers, timeout=120, limits=limits) as client:
        assert client.get("/v1/fine_tuning/jobs").status_code == 200
        with ThreadPoolExecutor(BURST) as pool:
            statuses = list(pool.map(lambda _: client.get("/v1/fine_tuning/jobs").status_code,
                                     range(BURST)))
    assert statuses == [200] * BURST
    assert checked_out() == 0
