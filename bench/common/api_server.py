"""Tunery's API as a real server for a benchmark: uvicorn with N worker processes in a child
process, and the CPU time it, and the PostgreSQL backends serving it, spend."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.common.machine import PROJECT_ROOT
from cli.process_commands import tunery_command

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(launcher: str, port: int, workers: int) -> list[str]:
    """`tunery api --workers N`, or (launcher "uvicorn") `uvicorn api.main:app --workers N`,
    whose shared socket leaves Nagle's algorithm on (see api/serve.py)."""
    if launcher == "uvicorn":
        return [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(workers)]
    return tunery_command("api", "--host", "127.0.0.1", "--port", str(port),
                          "--workers", str(workers))


@contextmanager
def api_server(env: dict[str, str], workers: int, log_path: Path, launcher: str = "tunery",
               start_timeout_s: float = 120) -> Iterator[tuple[str, int]]:
    """The API on a free local port with `workers` uvicorn processes; yields (base URL, the
    launcher's pid) once every worker has started, and stops them all afterwards."""
    port = free_port()
    cmd = server_command(launcher, port, workers)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_started(proc, base_url, workers, log_path, start_timeout_s)
        yield base_url, proc.pid
    finally:
        _stop(proc)


def _wait_until_started(proc: subprocess.Popen[bytes], base_url: str, workers: int,
                        log_path: Path, timeout_s: float) -> None:
    # /healthz answers as soon as one worker is up; the others are ready when each has
    # logged its start-up, so no phase measures a worker still importing.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}; see {log_path}")
        started = log_path.read_text(errors="replace").count("Application startup complete")
        if started >= workers:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.25)
    raise RuntimeError(f"uvicorn did not start {workers} workers in {timeout_s:.0f} s; "
                       f"see {log_path}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the workers go with it
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields 14 and 15 of stat(5), counted from after the command name.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    return {pid: process_cpu_s(pid) for pid in pids}


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two samples by the processes of `after`; a process started
    in between counts from zero. One that ended in between is lost, so this can undercount."""
    return sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items())
