"""Keep `tunery up`'s child processes running: one that exits is started again after a
backoff, until the stack is asked to stop; then all of them are stopped, SIGTERM first.

Each child runs in a process group of its own (`start_new_session`), so a signal to the
group reaches whatever the child started, and a restart clears what a killed child left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

Process = subprocess.Popen[bytes]


@dataclass(frozen=True)
class Backoff:
    """How long to wait before starting a child again: `first_s` after its first exit, twice
    as long after each exit that follows, at most `cap_s`. A child that ran `reset_after_s`
    before it exited starts counting from the first again: a worker the kernel kills once a
    day restarts at once, one that crashes as it starts does not spin."""

    first_s: float = 1.0
    cap_s: float = 30.0
    reset_after_s: float = 60.0

    def delay_s(self, exits_in_a_row: int) -> float:
        """The wait before the restart that follows the `exits_in_a_row`-th exit (from 1)."""
        return min(self.cap_s, self.first_s * 2.0 ** max(0, exits_in_a_row - 1))


def describe_exit(returncode: int) -> str:
    """"exited by SIGKILL" for a process a signal ended (Popen's negative code), else
    "exited with code N"."""
    if returncode < 0:
        try:
            return f"exited by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"exited by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class Child:
    """One supervised process. `start` starts it (and may raise: the start then counts as an
    exit); `on_exit(process)` runs once it has exited, before it starts again. `process`: the
    one already running when supervision begins, if any."""

    name: str
    start: Callable[[], Process]
    process: Process | None = None
    on_exit: Callable[[Process], None] | None = None
    started_at: float | None = None
    exits_in_a_row: int = 0
    restart_at: float | None = None


def _say(line: str) -> None:
    print(f"tunery up: {line}", file=sys.stderr, flush=True)


class Supervisor:
    """Restarts the `children` that exit (`check`, or `run` forever); `stop_all` ends them."""

    def __init__(self, children: Sequence[Child], backoff: Backoff = Backoff(),
                 say: Callable[[str], None] = _say,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.children = list(children)
        self.backoff = backoff
        self.say = say
        self.clock = clock
        for child in self.children:
            if child.started_at is None:
                child.started_at = clock()

    def run(self, interval_s: float = 0.2) -> NoReturn:
        """Supervise until an exception (SIGTERM or Ctrl-C, in `tunery up`) ends it."""
        while True:
            self.check()
            time.sleep(interval_s)

    def check(self) -> None:
        """One look at every child: note the ones that exited, start the ones that are due."""
        for child in self.children:
            if child.restart_at is None and child.process is not None:
                code = child.process.poll()
                if code is not None:
                    self._exited(child, describe_exit(code))
            if child.restart_at is not None and self.clock() >= child.restart_at:
                self._restart(child)

    def _exited(self, child: Child, how: str) -> None:
        now = self.clock()
        process = child.process
        if process is not None:
            # What the child started dies with it, so the new one starts alone.
            _signal_group(process, signal.SIGKILL)
        ran_s = now - (child.started_at or now)
        child.exits_in_a_row = 1 if ran_s >= self.backoff.reset_after_s else (
            child.exits_in_a_row + 1)
        delay = self.backoff.delay_s(child.exits_in_a_row)
        child.restart_at = now + delay
        at = time.strftime("%H:%M:%S", time.localtime(time.time() + delay))
        pid = f" (pid {process.pid})" if process is not None else ""
        self.say(f"the {child.name}{pid} {how} after {ran_s:.0f} s; restarting it in "
                 f"{delay:g} s, at {at}")
        if process is not None and child.on_exit is not None:
            try:
                child.on_exit(process)
            except Exception as exc:  # noqa: BLE001 - the supervisor must outlive any fault
                self.say(f"after the {child.name} exited: {exc}")

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.started_at = self.clock()
        try:
            child.process = child.start()
        except Exception as exc:  # noqa: BLE001 - a failed start is retried like an exit
            child.process = None
            self._exited(child, f"could not start ({exc})")
            return
        self.say(f"restarted the {child.name} (pid {child.process.pid})")

    def stop_all(self, grace_s: float) -> None:
        stop_processes([c.process for c in self.children if c.process is not None], grace_s)


def stop_processes(processes: Sequence[Process | None], grace_s: float) -> None:
    """SIGTERM each process's group, wait up to `grace_s` for them all, SIGKILL what is left
    (group members of a leader that already exited included)."""
    live = [p for p in processes if p is not None]
    for process in live:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for process in live:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: Process, sig: int) -> None:
    # The group id is the leader's pid (start_new_session); it stays valid while any member
    # lives, even after the leader exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
