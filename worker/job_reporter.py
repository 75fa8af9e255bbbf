"""The pipeline's reporter, backed by the job row: logs, metrics, phase and progress; stop
requests come from the attempt's `Heartbeat`."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.payload_secrets import redact_secrets
from worker.heartbeat import Heartbeat
from worker.metrics import AttemptMetrics
from worker.pipeline.errors import StopReason
from worker.pipeline.interrupts import uninterruptible
from worker.pipeline.report import WARNING_PREFIX

log = logging.getLogger("tunery.worker")

Write = Callable[[Session], object]

# Log lines and metrics kept in memory while the database is unreachable; the oldest go
# first beyond this (about an hour of one line and one metric per step at a step a second).
MAX_PENDING_WRITES = 10_000
# After a failed write, further reports only queue up for this long: a connect attempt to a
# database host that is down can take seconds, and training should not wait on each one.
RETRY_AFTER_S = 2.0


class DatabaseReporter:
    """Writes what the pipeline reports, fenced on the claim's attempt.

    A database outage does not stop training: writes wait in memory, in order, and go out with
    the next write that reaches the database. Whether training should stop is the heartbeat's
    call (cancel, lost lease, time limit).
    """

    def __init__(self, claim: Claim, heartbeat: Heartbeat, secrets: Iterable[str] = (),
                 attempt_metrics: AttemptMetrics | None = None) -> None:
        self.claim = claim
        self.heartbeat = heartbeat
        # Times the phases for Prometheus (`worker.metrics`); None: not timed.
        self.attempt_metrics = attempt_metrics
        # The job's plaintext secrets: replaced by *** in every line logged.
        self._secrets = tuple(s for s in secrets if s)
        self._pending: deque[Write] = deque(maxlen=MAX_PENDING_WRITES)
        self._retry_at = 0.0
        # Checkpoint uploads report from their own thread (`checkpoint_uploads`).
        self._lock = threading.RLock()

    def phase(self, name: str) -> None:
        if self.attempt_metrics is not None:
            self.attempt_metrics.enter_phase(name)
        self._write(lambda session: jobs.set_phase(session, self.claim, phase=name))
        self.log(f"phase: {name}")

    def progress(self, fraction: float) -> None:
        self._write(lambda session: jobs.set_phase(session, self.claim, progress=fraction))

    def log(self, line: str) -> None:
        line = redact_secrets(line, self._secrets)
        log.info("job %s: %s", self.claim.job_id, line)
        self._write(
            lambda session: jobs.append_log(session, self.claim.job_id, self.claim.attempt, line)
        )

    def warn(self, warning: str) -> None:
        warning = redact_secrets(warning, self._secrets)
        self._write(lambda session: jobs.add_warning(session, self.claim, warning))
        self.log(f"{WARNING_PREFIX}{warning}")

    def metric(self, step: int, values: dict[str, float]) -> None:
        self._write(
            lambda session: jobs.record_metric(
                session, self.claim.job_id, self.claim.attempt, step, values
            )
        )

    def checkpoint_saved(self, step: int, line: str) -> None:
        log.info("job %s: %s", self.claim.job_id, line)
        self._write(lambda session: jobs.record_checkpoint(
            session, self.claim.job_id, self.claim.attempt, step, line))

    def should_stop(self) -> StopReason | None:
        return self.heartbeat.stop_reason

    def flush(self) -> bool:
        """Write what waits; False if the database is still unreachable."""
        return self._write(None)

    def _write(self, write: Write | None) -> bool:
        with self._lock:
            return self._write_locked(write)

    def _write_locked(self, write: Write | None) -> bool:
        if write is not None:
            self._pending.append(write)
        if not self._pending:
            return True
        if write is not None and time.monotonic() < self._retry_at:
            return False
        try:
            # A stop signal must not cut a write in two (see worker.pipeline.interrupts).
            with uninterruptible(), session_scope() as session:
                for pending in self._pending:
                    pending(session)
        except (OperationalError, InterfaceError) as exc:
            if len(self._pending) == 1:  # first failure of an outage; later ones are quiet
                log.warning("job %s: database unreachable, keeping reports in memory: %s",
                            self.claim.job_id, exc)
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            return False
        except SQLAlchemyError:
            # Not an outage: retrying the same writes would fail forever.
            log.exception("job %s: dropping %d reports the database refused",
                          self.claim.job_id, len(self._pending))
            self._pending.clear()
            return False
        self._pending.clear()
        return True
