"""A private redis-server on a free port that a test can kill -9 and start again.

It keeps nothing on disk (`--save "" --appendonly no`), so a restart loses every queued and
unacknowledged message: exactly what a broker crash does to Tunery's wake-up calls.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import redis

from tests.chaos.polling import wait_until
from tests.chaos.processes import free_port


class RedisServer:
    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(self._answers_ping, timeout_s=15, what=f"redis-server on port {self.port}",
                   on_timeout=lambda: self.log_path.read_text(errors="replace")[-2000:])

    def kill(self) -> None:
        """kill -9: no shutdown save, no goodbye to clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def _answers_ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False
