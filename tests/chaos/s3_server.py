"""A private S3-compatible server (moto's `moto_server`) in its own process, which a test can
pause with SIGSTOP (a hung S3: connections are accepted, nothing answers) and resume, and a
TCP proxy in front of it that can refuse every connection (an S3 that is down).

The session's in-process moto server (`tests.conftest.s3_endpoint_url`) cannot be paused
without pausing the test itself: this one can.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from shared.storage import S3Storage
from tests.chaos.polling import wait_until
from tests.chaos.processes import free_port
from tests.chaos.tcp_proxy import TcpProxy

BUCKET = "tunery-chaos"
CREDENTIALS = {"access_key_id": "tunery-test", "secret_access_key": "tunery-test-secret"}


class S3Server:
    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.proxy = TcpProxy("127.0.0.1", self.port)

    @property
    def endpoint_url(self) -> str:
        """Where the services reach it: through the proxy."""
        return f"http://127.0.0.1:{self.proxy.port}"

    def start(self) -> None:
        command = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        assert command is not None, "moto_server is not installed (moto[server])"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [command, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(self._answers, timeout_s=30, what=f"moto_server on port {self.port}",
                   on_timeout=lambda: self.log_path.read_text(errors="replace")[-2000:])
        self.proxy.start()
        S3Storage(BUCKET, endpoint_url=f"http://127.0.0.1:{self.port}",
                  **CREDENTIALS).ensure_bucket()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, the server answers none."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.proxy.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    def service_env(self, *, retry_deadline_s: float, connect_timeout_s: float = 1.0,
                    read_timeout_s: float = 2.0) -> dict[str, str]:
        """The settings that point a service at this server, with the storage timeouts."""
        return {
            "TUNERY_STORAGE_URL": f"s3://{BUCKET}/",
            "TUNERY_S3_ENDPOINT_URL": self.endpoint_url,
            "TUNERY_S3_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
            "TUNERY_S3_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
            "TUNERY_STORAGE_CONNECT_TIMEOUT_S": str(connect_timeout_s),
            "TUNERY_STORAGE_READ_TIMEOUT_S": str(read_timeout_s),
            "TUNERY_STORAGE_RETRY_DEADLINE_S": str(retry_deadline_s),
        }

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {self.process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # an S3 error answer is an answer
        except OSError:
            return False
