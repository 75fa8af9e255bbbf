"""A cancel honoured while W&B starts its run: W&B waits on its servers for up to its
init timeout, and a job must not hold the worker that long once its user has cancelled it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from shared.schema import LoggingConfig
from tests.e2e.test_stops_and_files import SilentServer
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.interrupts import interrupt_main_thread
from worker.pipeline.wandb_reporting import wandb_reporting

INIT_TIMEOUT_S = 120
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
            config, tmp_path / "run", init_timeout_s=INIT_TIMEOUT_S, should_stop=should_stop
        ):
            pytest.fail("the W&B run started although the server never answers")
    finally:
        start_done.set()
        server.close()
    elapsed = time.monotonic() - started
    assert stopped.value.reason == "cancelled"
    # Far below the init timeout: the wait ended with the cancel, not with W&B's timeout.
    # (Tearing W&B down after the interrupted start still takes its own seconds.)
    assert elapsed < INIT_TIMEOUT_S / 2, elapsed
