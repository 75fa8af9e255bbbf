"""A stack whose database, broker and storage are all servers keeps no data dir: the API and
a worker started with PostgreSQL, Redis and S3, TUNERY_DATA_DIR unset and a fresh working
directory write nothing into the code tree or the working directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from cryptography.fernet import Fernet

from shared.settings import PROJECT_ROOT
from tests.chaos.polling import wait_until

# Celery prints this once the worker consumes from the broker.
WORKER_READY = " ready."
DEFAULT_DATA_DIR = PROJECT_ROOT / "data"


def tree(root: Path) -> set[str] | None:
    """Every path under `root`, relative; None when `root` does not exist."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_api_and_worker_on_servers_create_no_data_dir(
    tmp_path: Path, postgres_url: str, redis_url: str, s3_endpoint_url: str,
    s3_credentials: dict[str, str],
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache = tmp_path / "xdg-cache"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TUNERY_")}
    env.update(
        TUNERY_DATABASE_URL=postgres_url,
        TUNERY_BROKER_URL=redis_url,
        TUNERY_STORAGE_URL="s3://tunery-servers-only/",
        TUNERY_S3_ENDPOINT_URL=s3_endpoint_url,
        TUNERY_S3_ACCESS_KEY_ID=s3_credentials["access_key_id"],
        TUNERY_S3_SECRET_ACCESS_KEY=s3_credentials["secret_access_key"],
        TUNERY_SECRET_KEY=Fernet.generate_key().decode(),
        XDG_CACHE_HOME=str(cache),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(PROJECT_ROOT),
    )
    # A checkout where the embedded stack ran has a data dir already: then nothing may change
    # in it; in a fresh checkout (CI) it must not appear at all.
    data_before = tree(DEFAULT_DATA_DIR)
    port = free_port()
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    with api_log.open("wb") as out:
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    with worker_log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=cwd, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        # The worker waits for the schema the API's start migrates to; both at once is fine.
        wait_until(lambda: healthy(f"http://127.0.0.1:{port}/healthz"), timeout_s=120,
                   what="the API to answer", interval_s=0.2,
                   on_timeout=lambda: api_log.read_text(errors="replace")[-3000:])
        wait_until(lambda: WORKER_READY in worker_log.read_text(errors="replace"),
                   timeout_s=180, what="the worker to consume", interval_s=0.2,
                   on_timeout=lambda: worker_log.read_text(errors="replace")[-3000:])
        assert api.poll() is None and worker.poll() is None
    finally:
        stop(api)
        stop(worker)

    assert list(cwd.iterdir()) == []
    assert tree(DEFAULT_DATA_DIR) == data_before
    # The worker's scratch space went to the user's cache dir instead.
    assert (cache / "tunery" / "work").is_dir()
