"""The chaos harness on its own: a Redis restart loses messages, the proxy cuts and restores
PostgreSQL, kill -9 reaches a worker's children, waits fail clearly, and the report counts
duplicates as its docstring defines them."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.chaos.chaos_report import count_duplicates
from tests.chaos.job_records import Event, JobTrace, LogLine, Metric
from tests.chaos.polling import WaitTimeout, wait_until
from tests.chaos.processes import ServiceProcess
from tests.chaos.redis_server import RedisServer
from tests.chaos.tcp_proxy import TcpProxy


def test_redis_restart_on_the_same_port_loses_queued_messages(
    redis_server: RedisServer,
) -> None:
    port = redis_server.port
    redis_server.client().rpush("train", b"wake-up")
    assert redis_server.client().llen("train") == 1

    redis_server.restart()

    assert redis_server.port == port
    assert redis_server.client().llen("train") == 0


def test_proxy_cut_resets_open_connections_and_refuses_new_ones(
    postgres_proxy: TcpProxy, postgres_database: str
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{postgres_proxy.port}/{postgres_database}"
    with psycopg.connect(url, connect_timeout=3) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        postgres_proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=3)

    postgres_proxy.restore()

    with psycopg.connect(url, connect_timeout=3) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_kill_reaches_the_whole_process_group(tmp_path: Path) -> None:
    # A service that starts children of its own (a W&B service, DataLoader workers).
    spawner = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
              "'import time; time.sleep(600)']); print('child started', flush=True); " \
              "time.sleep(600)"
    process = ServiceProcess("spawner", [sys.executable, "-c", spawner], {},
                             tmp_path / "spawner.log")
    try:
        wait_until(lambda: "child started" in process.log_text(), timeout_s=20,
                   what="the child to start", on_timeout=process.log_tail)
        children = psutil.Process(process.pid).children(recursive=True)
        assert children

        process.kill()

        assert not process.is_alive()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"children outlived kill -9 of the group: {alive}"
    finally:
        process.stop()


def test_wait_until_names_what_it_waited_for_and_what_it_saw() -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="the answer; last seen: 41"):
        wait_until(lambda: False, timeout_s=0.3, what="the answer", on_timeout=lambda: 41)
    assert time.monotonic() - started < 5


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _trace(events: list[Event], steps: dict[int, list[int]], logs: list[LogLine]) -> JobTrace:
    metrics = [Metric(attempt, step, {"loss": 1.0}, T0 + timedelta(seconds=attempt * 100 + step))
               for attempt, attempt_steps in steps.items() for step in attempt_steps]
    return JobTrace({"id": "job", "status": "COMPLETED", "attempt": max(steps)}, events,
                    metrics, logs)


def _claim(attempt: int, second: int) -> Event:
    return Event("QUEUED", "RUNNING", attempt, "claimed", T0 + timedelta(seconds=second))


def test_a_resume_from_the_last_checkpoint_is_no_duplicate() -> None:
    trace = _trace(
        [_claim(1, 0), _claim(2, 150), Event("RUNNING", "COMPLETED", 2, None, T0)],
        {1: [1, 2, 3, 4, 5, 6, 7], 2: [7, 8, 9, 10]},
        [LogLine(1, "checkpoint at step 6 saved to storage (0.3 MB)", T0),
         LogLine(2, "resumed from step 6 (attempt 2)", T0)],
    )
    assert count_duplicates(trace, checkpoint_every=2).total == 0


def test_a_restart_from_scratch_after_a_checkpoint_counts_every_retrained_step() -> None:
    trace = _trace(
        [_claim(1, 0), _claim(2, 150)],
        {1: [1, 2, 3, 4, 5], 2: [1, 2, 3, 4, 5, 6]},
        [LogLine(1, "checkpoint at step 4 saved to storage (0.3 MB)", T0)],
    )
    found = count_duplicates(trace, checkpoint_every=2)
    assert found.resumed_steps_retrained == 4


def test_two_attempts_training_at_once_and_two_completions_are_duplicates() -> None:
    trace = _trace(
        [_claim(1, 0), _claim(2, 102), _claim(2, 103),
         Event("RUNNING", "COMPLETED", 1, None, T0), Event("RUNNING", "COMPLETED", 2, None, T0)],
        {1: [1, 2, 3, 4], 2: [1]},
        [],
    )
    found = count_duplicates(trace, checkpoint_every=2)
    # Attempt 1's steps 3 and 4 were recorded after attempt 2's claim at +102 s.
    assert found.concurrent_attempt_steps == 2
    assert found.extra_completions == 1
    assert found.double_claims == 1
