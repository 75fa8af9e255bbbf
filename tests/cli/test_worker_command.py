"""`tunery worker`, the worker image's command, as Docker or Kubernetes runs it: a SIGTERM
to its process alone (a container's PID 1 gets it, not a process group) leaves no process
behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli.process_commands import tunery_command
from tests.chaos.polling import wait_until
from tests.cli.conftest import clean_env
from tests.process_table import in_session

# Celery prints this once the worker consumes from the broker.
READY_MARK = " ready."


def test_sigterm_to_tunery_worker_leaves_no_process(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data", PYTHONUNBUFFERED="1")
    subprocess.run(tunery_command("db", "upgrade"), env=env, check=True,
                   stdout=subprocess.DEVNULL)
    log = tmp_path / "worker.log"
    # The `tunery` script the package installs, as the image's CMD names it.
    script = Path(sys.executable).with_name("tunery")
    with log.open("wb") as out:
        worker = subprocess.Popen([str(script), "worker"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: READY_MARK in log.read_text(errors="replace"), timeout_s=180,
                   what="the worker to consume", interval_s=0.2,
                   on_timeout=lambda: log.read_text(errors="replace")[-3000:])
        assert worker.poll() is None, log.read_text(errors="replace")
        # Celery is the command's own process, not a child it waits on.
        assert b"celery" in Path(f"/proc/{worker.pid}/cmdline").read_bytes()
        before = in_session(worker.pid)

        worker.send_signal(signal.SIGTERM)

        assert worker.wait(timeout=60) == 0, log.read_text(errors="replace")
        deadline = time.monotonic() + 5
        while in_session(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert in_session(worker.pid) == set(), (before, log.read_text(errors="replace"))
    finally:
        for pid in in_session(worker.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_worker_that_cannot_prepare_exits_instead_of_taking_jobs(tmp_path: Path) -> None:
    """Celery would log a failed start-up and consume all the same, claiming jobs it cannot
    run; the worker exits instead, for its supervisor to restart and report."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("x")
    env = clean_env(tmp_path / "data", PYTHONUNBUFFERED="1",
                    TUNERY_WORK_DIR=str(in_the_way / "work"))
    subprocess.run(tunery_command("db", "upgrade"), env=env, check=True,
                   stdout=subprocess.DEVNULL)
    script = Path(sys.executable).with_name("tunery")
    done = subprocess.run([str(script), "worker"], env=env, capture_output=True, text=True,
                          timeout=180, start_new_session=True)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "worker cannot start: NotADirectoryError" in output
    assert READY_MARK not in output


PAIR_ONLY = '[{"name": "pair", "devices": 2}]'


def test_a_worker_with_fewer_devices_than_its_class_refuses_to_start(tmp_path: Path) -> None:
    """It would claim the class's 2-device jobs with one device to train them on."""
    env = clean_env(tmp_path / "data", TUNERY_DEVICE_CLASSES=PAIR_ONLY)

    done = subprocess.run(tunery_command("worker"), env=env, capture_output=True, text=True,
                          timeout=60)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        "tunery worker: TUNERY_WORKER_DEVICE_CLASS 'pair' has 2 devices but this worker owns 1 "
        "(TUNERY_WORKER_DEVICES): it would claim jobs that need 2; set TUNERY_WORKER_DEVICES "
        "to 2 on a host that has them, or serve a class with fewer"]


def test_celery_started_directly_refuses_a_class_with_more_devices_too(tmp_path: Path) -> None:
    """`celery -A worker.tasks worker`, without `tunery worker`'s check: the worker's start-up
    refuses as well, before it consumes."""
    env = clean_env(tmp_path / "data", PYTHONUNBUFFERED="1", TUNERY_DEVICE_CLASSES=PAIR_ONLY)
    subprocess.run(tunery_command("db", "upgrade"), env=env, check=True,
                   stdout=subprocess.DEVNULL)
    celery = [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", "--concurrency",
              "1", "--without-gossip", "--without-mingle"]

    done = subprocess.run(celery, env=env, capture_output=True, text=True, timeout=180,
                          start_new_session=True)

    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "worker cannot start: RuntimeError: TUNERY_WORKER_DEVICE_CLASS 'pair' has 2 " \
        "devices but this worker owns 1" in output
    assert READY_MARK not in output
