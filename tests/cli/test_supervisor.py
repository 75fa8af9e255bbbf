"""`cli.supervisor`: the backoff schedule, and the supervise loop over real short-lived
processes, on a clock the test moves."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from cli.supervisor import Backoff, Child, Supervisor, describe_exit, stop_processes
from tests.cli.test_up import alive, wait_gone


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    backoff = Backoff(first_s=1.0, cap_s=30.0)

    assert [backoff.delay_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_exit_codes_and_signals_are_named() -> None:
    assert describe_exit(-signal.SIGKILL) == "exited by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exiting(code: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"],
                               start_new_session=True)
    process.wait()
    return process


def sleeping() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def test_a_child_that_keeps_exiting_restarts_later_each_time_and_at_once_after_a_long_run(
) -> None:
    clock, lines, exited = FakeClock(), [], []
    starts: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        starts.append(exiting(3))
        return starts[-1]

    child = Child("worker", start, exiting(3), on_exit=lambda p: exited.append(p.returncode))
    supervisor = Supervisor([child], Backoff(first_s=1, cap_s=4, reset_after_s=60),
                            say=lines.append, clock=clock)

    waits = []
    for _ in range(4):
        supervisor.check()  # notes the exit, schedules the restart
        assert child.restart_at is not None
        waits.append(child.restart_at - clock.now)
        clock.now = child.restart_at - 0.01
        supervisor.check()
        assert len(starts) == len(waits) - 1, "restarted before its backoff ended"
        clock.now = child.restart_at
        supervisor.check()
        assert len(starts) == len(waits)

    assert waits == [1, 2, 4, 4]
    assert exited == [3, 3, 3, 3]
    assert "the worker (pid " in lines[0] and ") exited with code 3 after 0 s; restarting it " \
        "in 1 s, at " in lines[0], lines
    assert lines[1] == f"restarted the worker (pid {starts[0].pid})"

    # This one ran past reset_after_s before it exited: the schedule starts over.
    clock.now += 61
    supervisor.check()
    assert child.restart_at == clock.now + 1


def test_a_killed_child_is_named_by_its_signal_and_a_failed_start_is_retried() -> None:
    clock, lines = FakeClock(), []
    victim = sleeping()
    attempts = []

    def start() -> subprocess.Popen[bytes]:
        attempts.append(clock.now)
        if len(attempts) == 1:
            raise RuntimeError("port 8089 is taken")
        return sleeping()

    child = Child("inference engine", start, victim)
    supervisor = Supervisor([child], Backoff(first_s=2, cap_s=10), say=lines.append,
                            clock=clock)
    try:
        supervisor.check()
        assert child.restart_at is None  # still running: nothing to do
        victim.kill()
        victim.wait()
        supervisor.check()
        assert f"the inference engine (pid {victim.pid}) exited by SIGKILL" in lines[0]

        clock.now += 2
        supervisor.check()
        assert "could not start (port 8089 is taken)" in lines[1]
        assert "restarting it in 4 s" in lines[1]
        clock.now += 4
        supervisor.check()
        assert child.process is not None and child.process.poll() is None
        assert lines[2] == f"restarted the inference engine (pid {child.process.pid})"
    finally:
        supervisor.stop_all(grace_s=5)
    assert child.process is not None and child.process.returncode == -signal.SIGTERM


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace_period() -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True)
    polite = sleeping()
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"

    started = time.monotonic()
    stop_processes([stubborn, polite, None], grace_s=1.0)

    assert time.monotonic() - started >= 1.0
    assert (stubborn.returncode, polite.returncode) == (-signal.SIGKILL, -signal.SIGTERM)
    assert wait_gone({stubborn.pid, polite.pid}, timeout_s=1) == set()


@pytest.mark.parametrize("code", [0, 1])
def test_a_child_that_exits_cleanly_is_restarted_too(code: int) -> None:
    # The embedded stack has no child that is meant to end: even a clean exit is a loss.
    clock, lines = FakeClock(), []
    fresh: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        fresh.append(sleeping())
        return fresh[-1]

    child = Child("API", start, exiting(code))
    supervisor = Supervisor([child], Backoff(first_s=1), say=lines.append, clock=clock)
    try:
        supervisor.check()
        clock.now += 1
        supervisor.check()
        assert len(fresh) == 1 and alive(fresh[0].pid)
    finally:
        supervisor.stop_all(grace_s=5)
