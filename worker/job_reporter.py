"""The pipeline's reporter, backed by the job row: logs, metrics, phase, lease and cancel."""

from __future__ import annotations

import logging
import time

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim

log = logging.getLogger("tunery.worker")


class DatabaseReporter:
    """Writes what the pipeline reports, fenced on the claim's attempt.

    `should_stop()` is polled every optimizer step; it renews the lease at most every
    `renew_every_s` so a fast training loop does not hammer the database.
    """

    def __init__(self, claim: Claim, lease_seconds: int, renew_every_s: float = 2.0) -> None:
        self.claim = claim
        self.lease_seconds = lease_seconds
        self.renew_every_s = renew_every_s
        self._last_renew = 0.0
        self._stop_reason: str | None = None

    def phase(self, name: str) -> None:
        with session_scope() as session:
            jobs.set_phase(session, self.claim, phase=name)
        self.log(f"phase: {name}")

    def progress(self, fraction: float) -> None:
        with session_scope() as session:
            jobs.set_phase(session, self.claim, progress=fraction)

    def log(self, line: str) -> None:
        log.info("job %s: %s", self.claim.job_id, line)
        with session_scope() as session:
            jobs.append_log(session, self.claim.job_id, self.claim.attempt, line)

    def metric(self, step: int, values: dict[str, float]) -> None:
        with session_scope() as session:
            jobs.record_metric(session, self.claim.job_id, self.claim.attempt, step, values)

    def should_stop(self) -> str | None:
        if self._stop_reason is not None:
            return self._stop_reason
        now = time.monotonic()
        if now - self._last_renew < self.renew_every_s:
            return None
        self._last_renew = now
        with session_scope() as session:
            held, cancel = jobs.renew_lease(session, self.claim, self.lease_seconds)
        if not held:
            self._stop_reason = "lease_lost"
        elif cancel:
            self._stop_reason = "cancelled"
        return self._stop_reason
