"""The retry policy of storage calls, on a fake clock: its waits, its one deadline, its log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shared.storage import LocalStorage, ObjectNotFound, StorageError, StorageUnreachable
from shared.storage_retry import RetryingStorage, RetryPolicy, call_with_retries
from tests.fake_clock import FakeClock


class FakeTime:
    """A clock whose sleep moves it, and a record of the sleeps."""

    def __init__(self) -> None:
        self.clock = FakeClock(0.0)
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.now += seconds

    def policy(self, deadline_s: float, **kwargs: float) -> RetryPolicy:
        return RetryPolicy(deadline_s, clock=self.clock, sleep=self.sleep, **kwargs)


def failing(times: int, error: StorageError | None = None) -> Callable[[], str]:
    """A call that fails `times` times, then answers "ok"."""
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error or StorageUnreachable(f"Could not connect (try {calls['n']})")
        return "ok"

    return call


def test_backoff_doubles_up_to_its_cap_and_an_answer_ends_it() -> None:
    fake = FakeTime()
    lines: list[str] = []
    result = call_with_retries(failing(7), fake.policy(300, max_wait_s=20), log=lines.append)
    assert result == "ok"
    assert fake.sleeps == [1, 2, 4, 8, 16, 20, 20]
    assert lines[2] == "storage unavailable, retry 3 in 4 s: Could not connect (try 3)"
    assert len(lines) == 7  # one line per retry


def test_the_deadline_counts_from_the_first_failure_and_ends_with_the_cause() -> None:
    fake = FakeTime()
    fake.clock.now = 500.0  # calls before the outage do not shorten it
    lines: list[str] = []
    with pytest.raises(StorageUnreachable) as raised:
        call_with_retries(failing(1000), fake.policy(60, max_wait_s=30), log=lines.append)
    # 1+2+4+8+16 = 31 s, then 29 s to reach the deadline exactly, then one last try.
    assert fake.sleeps == [1, 2, 4, 8, 16, 29]
    assert sum(fake.sleeps) == 60
    assert "past the retry deadline of 60 s" in str(raised.value)
    assert "Could not connect (try 7)" in str(raised.value)
    assert lines[-1] == "storage unavailable, retry 6 in 29 s: Could not connect (try 6)"


@pytest.mark.parametrize("error", [ObjectNotFound("no object"), StorageError("access denied")])
def test_errors_that_waiting_cannot_fix_are_raised_at_once(error: StorageError) -> None:
    fake = FakeTime()
    with pytest.raises(type(error)):
        call_with_retries(failing(1, error), fake.policy(300))
    assert fake.sleeps == []


class FlakyStorage(LocalStorage):
    """A local store whose next `outage` calls fail as an unreachable server would."""

    outage = 0

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.outage:
            self.outage -= 1
            raise StorageUnreachable("Connection refused")
        super().put_bytes(key, data)


def test_retrying_storage_rides_out_an_outage_shorter_than_its_deadline(tmp_path: Path) -> None:
    fake = FakeTime()
    flaky = FlakyStorage(tmp_path)
    flaky.outage = 3
    lines: list[str] = []
    store = RetryingStorage(flaky, fake.policy(300), log=lines.append)
    store.put_bytes("a/b", b"data")
    assert flaky.download_file("a/b", tmp_path / "out") is None
    assert (tmp_path / "out").read_bytes() == b"data"
    assert [line.split(":")[0] for line in lines] == [
        "storage unavailable, retry 1 in 1 s",
        "storage unavailable, retry 2 in 2 s",
        "storage unavailable, retry 3 in 4 s",
    ]
