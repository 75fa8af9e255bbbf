"""Failed authentications per client address: wrong API keys and wrong upload tokens get 429
with Retry-After once an address is over TUNERY_AUTH_FAILURES_PER_MINUTE, valid keys from it
keep working, other addresses are unaffected. Real app, SQLite, local storage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.limits.auth_failures import FailedAuthLimiter
from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.fake_clock import FakeClock

LIMIT = 5
WRONG = {"Authorization": "Bearer tun_wrong_0123456789abcdef"}


@pytest.fixture
def app_at(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`app_at(address)`: a client of one app (and so one limiter) from that address."""
    monkeypatch.setenv("TUNERY_AUTH_FAILURES_PER_MINUTE", str(LIMIT))
    get_settings.cache_clear()
    from api.main import create_app

    app = create_app()
    clients: list[TestClient] = []

    def at(address: str) -> TestClient:
        client = TestClient(app, client=(address, 40000))
        client.__enter__()
        clients.append(client)
        return client

    yield at
    for client in reversed(clients):
        client.__exit__(None, None, None)


def test_wrong_keys_past_the_budget_get_429_while_a_valid_key_still_works(app_at: Any) -> None:
    client = app_at("203.0.113.7")
    key = new_key("tenant-a")
    for _ in range(LIMIT):
        assert client.get("/v1/me", headers=WRONG).status_code == 401
    refused = client.get("/v1/me", headers=WRONG)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_failed_attempts"
    assert int(refused.headers["Retry-After"]) >= 1
    assert client.get("/v1/me", headers={"Authorization": ""}).status_code == 429  # missing key
    # The address's clients with a valid key are served: a shared NAT is not locked out.
    assert client.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # Another address has its own budget.
    assert app_at("198.51.100.9").get("/v1/me", headers=WRONG).status_code == 401


def test_wrong_upload_tokens_past_the_budget_get_429(app_at: Any) -> None:
    client = app_at("203.0.113.8")
    client.headers["Authorization"] = f"Bearer {new_key('tenant-a')}"
    dataset_id = client.get("/v1/upload", params={"filename": "a.jsonl"}).json()["dataset_id"]
    for _ in range(LIMIT):
        wrong = client.put(f"/v1/upload/{dataset_id}?token=guess", content=b'{"a": 1}\n')
        assert wrong.status_code == 403, wrong.text
    refused = client.put(f"/v1/upload/{dataset_id}?token=guess", content=b'{"a": 1}\n')
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    # Unauthenticated: the upload PUT needs no key, another address may still try.
    other = app_at("198.51.100.10").put(f"/v1/upload/{dataset_id}?token=guess", content=b"x")
    assert other.status_code == 403


def test_the_failure_budget_refills_and_zero_turns_it_off() -> None:
    clock = FakeClock()
    limiter = FailedAuthLimiter(60, clock=clock)  # one a second
    assert all(limiter.failed("a") is None for _ in range(60))
    assert limiter.failed("a") == 1
    assert limiter.failed("b") is None  # per address
    clock.now += 1.0
    assert limiter.failed("a") is None
    assert limiter.failed("a") is not None
    off = FailedAuthLimiter(0)
    assert all(off.failed("a") is None for _ in range(1000))


def test_the_limiter_tracks_a_bounded_number_of_addresses() -> None:
    limiter = FailedAuthLimiter(2, max_addresses=100, clock=FakeClock())
    for i in range(10_000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert limiter.tracked() == 100
    # The most recent failures are the ones kept.
    limiter.failed("10.0.39.15")
    assert limiter.failed("10.0.39.15") is not None
