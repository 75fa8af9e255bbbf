"""Stops delivered into the main thread where it waits outside the training loop: a blocking
socket read (a download), a library that wraps the exception, the reporter's database writes
(never cut), and the end of the region (a late signal raises nothing). The last case runs a
real heartbeat thread against a real database with a real cancel."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from tests.conftest import make_payload
from worker.heartbeat import Heartbeat
from worker.job_reporter import DatabaseReporter
from worker.pipeline import interrupts
from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped
from worker.pipeline.interrupts import (
    InterruptibleRegion,
    interrupt_main_thread,
    uninterruptible,
)

pytestmark = pytest.mark.skipif(interrupts.STOP_SIGNAL is None, reason="no real-time signals")


class Stop:
    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self) -> str | None:
        return self.reason


@pytest.fixture
def silent_socket() -> Iterator[socket.socket]:
    """A connected socket whose peer never sends: a read on it blocks until interrupted."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    yield client
    for s in (client, peer, server):
        s.close()


def later(delay_s: float, action: object) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_stop_interrupts_a_blocking_read_inside_the_region(
    silent_socket: socket.socket,
) -> None:
    stop = Stop()

    def ask() -> None:
        stop.reason = "cancelled"
        assert interrupt_main_thread()

    started = time.monotonic()
    with pytest.raises(TrainingStopped, match="cancelled"), InterruptibleRegion(stop):
        later(0.3, ask)
        silent_socket.recv(1)  # would block forever
    assert time.monotonic() - started < 10


def test_a_wrapped_interruption_still_ends_as_training_stopped() -> None:
    stop = Stop()
    with pytest.raises(TrainingStopped, match="lease_lost"), InterruptibleRegion(stop):
        try:
            stop.reason = "lease_lost"
            signal.pthread_kill(threading.main_thread().ident or 0, interrupts.STOP_SIGNAL or 0)
            time.sleep(5)
        except Exception as exc:  # as a library that reports every failure its own way
            raise PipelineError(f"download failed: {exc!r}") from None


def test_no_interruption_after_the_region_or_inside_a_database_write() -> None:
    stop = Stop()
    region = InterruptibleRegion(stop)
    with region:
        with uninterruptible():
            stop.reason = "cancelled"
            assert not interrupt_main_thread()
            signal.pthread_kill(threading.main_thread().ident or 0, interrupts.STOP_SIGNAL or 0)
            time.sleep(0.2)  # the handler ran, and let the write finish
        region.end()
        # A signal sent as the region ended: ignored.
        signal.pthread_kill(threading.main_thread().ident or 0, interrupts.STOP_SIGNAL or 0)
        time.sleep(0.2)
    assert not interrupt_main_thread()
    with pytest.raises(TrainingStopped):  # a stop asked for before the region: at its start
        InterruptibleRegion(stop).__enter__()
    assert not interrupt_main_thread()  # ... and that region is not left armed


def test_a_region_outside_the_main_thread_only_checks() -> None:
    stop, outcome = Stop(), []

    def body() -> None:
        with InterruptibleRegion(stop):
            assert not interrupt_main_thread()
        stop.reason = "cancelled"
        try:
            InterruptibleRegion(stop).__enter__()
        except TrainingStopped as exc:
            outcome.append(exc.reason)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert outcome == ["cancelled"]


@pytest.fixture
def claim(tunery_env: Path) -> Claim:
    upgrade_database(get_settings().database.url)
    with session_scope() as session:
        tenant = create_api_key(session, "hb").tenant_id
        job_id = jobs.create_job(
            session, tenant, FinetuneRequest.model_validate(make_payload()), 3, device_class="train"
        ).id
        claimed = jobs.claim_job(session, job_id, "w", 30)
    assert claimed is not None
    return claimed


def test_the_heartbeat_interrupts_a_stalled_download_on_cancel(
    claim: Claim, silent_socket: socket.socket
) -> None:
    beat = Heartbeat(claim, lease_seconds=30, every_s=0.2, soft_limit_s=3600,
                     hard_limit_s=7200)
    reporter = DatabaseReporter(claim, beat)

    def cancel() -> None:
        with session_scope() as session:
            tenant = session.get_one(Job, claim.job_id).tenant_id
            jobs.request_cancel(session, tenant, claim.job_id)

    beat.start()
    try:
        started = time.monotonic()
        with pytest.raises(TrainingStopped) as stopped, InterruptibleRegion(reporter.should_stop):
            reporter.phase("loading_data")  # a database write inside the region
            later(0.5, cancel)
            silent_socket.recv(1)
        assert stopped.value.reason == StopReason.CANCELLED
        assert time.monotonic() - started < 10
    finally:
        beat.end()
        beat.join()
