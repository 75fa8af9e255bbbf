"""W&B bounded at both ends of a run. A cancel is honoured while W&B starts its run (W&B
waits on its servers for up to its init timeout, and a job must not hold the worker that long
once its user has cancelled it), and a W&B service that never ends its run cannot hold the
worker past the finish timeout."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from shared.schema import LoggingConfig
from tests.e2e.test_stops_and_files import SilentServer
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.interrupts import interrupt_main_thread
from worker.pipeline.wandb_reporting import (
    TEARDOWN_GRACE_S,
    WandbTimeouts,
    _service_process,
    wandb_reporting,
)

INIT_TIMEOUT_S = 120
FINISH_TIMEOUT_S = 3
TIMEOUTS = WandbTimeouts(start_s=INIT_TIMEOUT_S, finish_s=FINISH_TIMEOUT_S)
KEY = "wandbkey" + "z" * 32


def test_a_cancel_interrupts_a_wandb_start_waiting_on_a_silent_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # W&B's servers cannot be reached from here: a server that accepts and never answers
    # stands in for them, as an unreachable network shows them.
    server = SilentServer()
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = LoggingConfig(use_wandb=True, wandb_project="tunery-test", wandb_login_key=KEY)
    cancelled = threading.Event()
    start_done = threading.Event()

    def should_stop() -> str | None:
        return "cancelled" if cancelled.is_set() else None

    def heartbeat() -> None:
        # As worker.heartbeat does once a cancel is seen: signal on every beat.
        time.sleep(2.0)
        cancelled.set()
        while not start_done.wait(0.5):
            interrupt_main_thread()

    threading.Thread(target=heartbeat, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(TrainingStopped) as stopped, wandb_reporting(
            config, tmp_path / "run", timeouts=TIMEOUTS, should_stop=should_stop
        ):
            pytest.fail("the W&B run started although the server never answers")
    finally:
        start_done.set()
        server.close()
    elapsed = time.monotonic() - started
    assert stopped.value.reason == "cancelled"
    # Far below the init timeout: the wait ended with the cancel, not with W&B's timeout.
    # Tearing W&B down after the interrupted start takes its own seconds, bounded by the
    # finish timeout: a service still waiting on the silent server is stopped.
    assert elapsed < 2.0 + FINISH_TIMEOUT_S + 2 * TEARDOWN_GRACE_S + 5, elapsed


def test_a_wedged_wandb_service_is_stopped_after_the_finish_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline: W&B runs its service process and writes the run to disk, no server needed.
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = LoggingConfig(use_wandb=True, wandb_project="tunery-test", wandb_login_key=KEY)
    lines: list[str] = []
    import wandb

    with wandb_reporting(config, tmp_path / "run", timeouts=TIMEOUTS, log=lines.append):
        service = _service_process(wandb)
        assert service is not None and service.poll() is None
        # A service that never answers again: the teardown's wait on it has no end.
        os.kill(service.pid, signal.SIGSTOP)
        started = time.monotonic()
    elapsed = time.monotonic() - started
    assert service.poll() == -signal.SIGKILL
    assert FINISH_TIMEOUT_S <= elapsed < FINISH_TIMEOUT_S + 2 * TEARDOWN_GRACE_S + 5, elapsed
    assert any(f"did not finish within {FINISH_TIMEOUT_S} s" in line for line in lines), lines
    assert os.environ.get("WANDB_API_KEY") != KEY
    # The worker's next job reports to W&B through a new service.
    with wandb_reporting(config, tmp_path / "next", timeouts=TIMEOUTS, log=lines.append):
        assert _service_process(wandb) not in (None, service)
    assert lines[-1] == "Weights & Biases run started", lines


def test_a_wandb_run_that_ends_normally_stops_its_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = LoggingConfig(use_wandb=True, wandb_project="tunery-test", wandb_login_key=KEY)
    lines: list[str] = []
    import wandb

    with wandb_reporting(config, tmp_path / "run", timeouts=TIMEOUTS, log=lines.append):
        service = _service_process(wandb)
        assert service is not None
        wandb.log({"loss": 1.0})
    assert service.poll() is not None, "W&B's service process outlived the job"
    assert not any("did not finish" in line for line in lines), lines
