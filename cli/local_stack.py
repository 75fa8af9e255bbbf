"""Start the API and a worker as child processes: `tunery up`, the demo and e2e tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

from cli.process_commands import tunery_command, worker_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalStack:
    """API + worker processes sharing one environment (and so one database, broker, storage).

    Output goes to `log_dir` when given (tests read it on failure), else to this terminal.
    """

    def __init__(self, env: dict[str, str], port: int | None = None,
                 log_dir: Path | None = None, start_timeout_s: float = 60.0) -> None:
        self.env = env
        self.port = port or free_port()
        self.log_dir = log_dir
        self.start_timeout_s = start_timeout_s
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = (self.log_dir / f"{name}.log").open("ab")
        return subprocess.Popen(argv, env=self.env, stdout=out,
                                stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)

    def start_api(self) -> None:
        # Migrations run once here, before the worker starts, so the two never race on them.
        subprocess.run(tunery_command("db", "upgrade"), env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        self.api = self._spawn("api", tunery_command("api", "--port", str(self.port)))
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited with code {self.api.returncode}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the API did not answer on {self.base_url} in time")

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", worker_command())

    def __enter__(self) -> LocalStack:
        try:
            self.start_api()
            self.start_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def wait(self) -> None:
        try:
            while all(p is not None and p.poll() is None for p in (self.api, self.worker)):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.worker, sig)
        self.worker = None

    def stop(self) -> None:
        self.stop_worker()
        _stop(self.api, signal.SIGTERM)
        self.api = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _stop(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
