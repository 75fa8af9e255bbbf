"""Tunery processes a chaos test starts and kills: workers, the API, one-off CLI commands.

Each runs in a process group of its own, so kill -9 reaches whatever it started; output goes
to one log file per process, shown when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import httpx

from cli.process_commands import tunery_command
from shared.settings import PROJECT_ROOT
from tests.chaos.polling import wait_until

STARTUP_TIMEOUT_S = 60
# Celery prints this once the worker consumes from the broker.
WORKER_READY_MARK = " ready."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(env: Mapping[str, str], *args: str) -> str:
    """Run `tunery ARGS` to completion; its stdout."""
    done = subprocess.run(tunery_command(*args), env=dict(env),
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"tunery {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stdout}\n{done.stderr}")
    return done.stdout


class ServiceProcess:
    """One long-running process with its own process group and log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env=dict(env), cwd=PROJECT_ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def kill(self) -> None:
        """kill -9 the whole process group: no cleanup, no ack, no last write."""
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=15)

    def stop(self, grace_s: float = 10) -> None:
        """SIGTERM, then kill -9 whatever is left of the group."""
        if self.is_alive():
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace_s)
        # Children outlive their parent when it exits first: clear the group in any case.
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=15)

    def send(self, sig: int) -> None:
        """Send `sig` to the process group, as a supervisor stopping the service does."""
        self._signal_group(sig)

    def wait_exit(self, timeout_s: float) -> int:
        """The exit code once the process has exited by itself within `timeout_s`."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running {timeout_s:g} s later:\n"
                                 f"{self.log_tail()}") from None

    def _signal_group(self, sig: int) -> None:
        # The group id is the leader's pid (start_new_session); it stays valid while any
        # member lives, even after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def fail_if_dead(self) -> None:
        if not self.is_alive():
            raise AssertionError(f"{self.name} exited with code {self.process.returncode}:\n"
                                 f"{self.log_tail()}")


class WorkerProcess(ServiceProcess):
    """`tunery worker`: a Celery worker, solo pool, one job at a time."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        super().__init__(name, tunery_command("worker"), env, log_path)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> WorkerProcess:
        def ready() -> bool:
            self.fail_if_dead()
            return WORKER_READY_MARK in self.log_text()

        wait_until(ready, timeout_s=timeout_s, what=f"{self.name} to consume",
                   on_timeout=self.log_tail)
        return self

    def last_step_logged(self, job_id: str) -> tuple[int, int] | None:
        """(step, total) of the job's latest training log line in this worker's own output,
        which unlike the database's job_logs is written even while PostgreSQL is away."""
        found = None
        for match in re.finditer(rf"job {re.escape(job_id)}: .*?\| step (\d+)/(\d+) ",
                                 self.log_text()):
            found = int(match[1]), int(match[2])
        return found

    def received_task_ids(self) -> list[str]:
        """Celery task ids this worker received, in order (one per delivery)."""
        ids = []
        for line in self.log_text().splitlines():
            if "Task tunery.train[" in line and line.rstrip().endswith("received"):
                ids.append(line.split("Task tunery.train[", 1)[1].split("]", 1)[0])
        return ids


class ApiProcess(ServiceProcess):
    """`tunery api --port P`."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        argv = tunery_command("api", "--port", str(self.port))
        super().__init__(name, argv, env, log_path)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> ApiProcess:
        def healthy() -> bool:
            self.fail_if_dead()
            try:
                return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout_s=timeout_s, what=f"{self.name} on {self.base_url}",
                   interval_s=0.2, on_timeout=self.log_tail)
        return self
