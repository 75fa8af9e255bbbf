"""The heartbeat of a running attempt: lease renewal, cancel, pause, time limits and the
worker's shutdown, in a thread.

A thread rather than a training callback, because the lease must also survive what happens
outside optimizer steps: loading a large base model, a long first step, the upload. The
training loop reads `stop_reason` (through the reporter's `should_stop()`) after every
micro-batch and evaluation batch, so a cancel or a lost lease ends training within one
heartbeat and one batch. The stages before it (downloads, parsing, tokenizing, loading the
model) never ask: while the main thread is in one of them, each beat with a stop reason
interrupts it (`worker.pipeline.interrupts`), so they end within about one heartbeat too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from worker.metrics import LEASE_RENEWALS, LEASES_LOST
from worker.pipeline.errors import StopReason
from worker.pipeline.interrupts import interrupt_main_thread
from worker.shutdown import shutting_down

log = logging.getLogger("tunery.worker")

def exit_stuck_worker() -> None:
    """Past the hard limit, training ignored every request to stop: free the GPU the only sure
    way. The reaper fails the job; the process supervisor starts a fresh worker."""
    log.critical("job still running past the hard time limit; exiting the worker process")
    logging.shutdown()
    os._exit(70)


class Heartbeat(threading.Thread):
    """Renews `claim`'s lease every `every_s` and sets `stop_reason` once training should end:

    - `cancelled`: the user asked;
    - `paused`: the user asked to pause (a cancel read by the same beat wins);
    - `lease_lost`: the job moved on without this attempt (re-queued, failed by the reaper), or
      the database has been unreachable for longer than a lease, so the reaper will have
      re-queued it: training on would only duplicate the next attempt's work;
    - `timeout`: the attempt has run `soft_limit_s`;
    - `worker_stopping`: this worker process is shutting down (`worker.shutdown`).

    A database outage shorter than the lease pauses nothing: training goes on and the next
    renewal succeeds. Past `hard_limit_s`, `on_hard_limit` runs (by default: exit the process).
    """

    def __init__(
        self,
        claim: Claim,
        *,
        lease_seconds: float,
        every_s: float,
        soft_limit_s: float,
        hard_limit_s: float,
        on_hard_limit: Callable[[], None] = exit_stuck_worker,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name=f"heartbeat-{claim.job_id}", daemon=True)
        self.claim = claim
        self.lease_seconds = lease_seconds
        self.every_s = every_s
        self.soft_limit_s = soft_limit_s
        self.hard_limit_s = hard_limit_s
        self.on_hard_limit = on_hard_limit
        self.clock = clock
        self.started_at = clock()
        self.last_renewed_at = self.started_at  # the claim itself set the lease
        self.stop_reason: StopReason | None = None
        self._ended = threading.Event()

    def run(self) -> None:
        while not self._ended.wait(self.every_s):
            self.beat()
            if self.stop_reason is not None and not self._ended.is_set():
                # On every beat from the first with a reason: library code may have caught an
                # interruption and gone on (a retry). Outside an interruptible region (the
                # training loop, uploads) this does nothing.
                interrupt_main_thread()

    def end(self) -> None:
        """The attempt is over: stop renewing."""
        self._ended.set()

    def holds_lease(self) -> bool:
        """Whether the lease is still this attempt's: renewed within a lease, or else renewed
        now. A process continued after a SIGSTOP longer than its lease asks before its
        heartbeat thread has beaten again: the renewal says whether another attempt took the
        job meanwhile (refused) or nobody did (renewed, and the attempt goes on)."""
        if self.stop_reason == StopReason.LEASE_LOST:
            return False
        if self.clock() - self.last_renewed_at >= self.lease_seconds:
            self._renew(self.clock())
        return (self.stop_reason != StopReason.LEASE_LOST
                and self.clock() - self.last_renewed_at < self.lease_seconds)

    def beat(self) -> None:
        now = self.clock()
        elapsed = now - self.started_at
        if elapsed >= self.hard_limit_s:
            self._request_stop(StopReason.TIMEOUT)
            self.on_hard_limit()
            return
        if elapsed >= self.soft_limit_s:
            self._request_stop(StopReason.TIMEOUT)
        self._renew(now)
        # After the renewal: a cancel read by the same beat wins, and the job ends CANCELLED.
        if shutting_down():
            self._request_stop(StopReason.WORKER_STOPPING)

    def _renew(self, now: float) -> None:
        try:
            with session_scope() as session:
                renewal = jobs.renew_lease(session, self.claim, int(self.lease_seconds))
        except SQLAlchemyError as exc:
            LEASE_RENEWALS.labels("unreachable").inc()
            unreachable_s = now - self.last_renewed_at
            log.warning("job %s: lease renewal failed (%.0f s without one): %s",
                        self.claim.job_id, unreachable_s, exc)
            if unreachable_s >= self.lease_seconds:
                self._request_stop(StopReason.LEASE_LOST)
            return
        self.last_renewed_at = now
        LEASE_RENEWALS.labels("renewed" if renewal.held else "refused").inc()
        if not renewal.held:
            self._request_stop(StopReason.LEASE_LOST)
        elif renewal.cancel_requested:
            self._request_stop(StopReason.CANCELLED)
        elif renewal.pause_requested:
            self._request_stop(StopReason.PAUSED)

    def _request_stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            if reason == StopReason.LEASE_LOST:
                LEASES_LOST.inc()
            if self._ended.is_set():  # a beat that overlapped the end of the attempt
                return
            log.warning("job %s attempt %s: stopping (%s)", self.claim.job_id,
                        self.claim.attempt, reason)
