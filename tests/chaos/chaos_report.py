"""The figures each chaos scenario reports: jobs submitted, completed, lost, duplicate
trainings and recovery time, printed and appended as a JSON line to `$TUNERY_CHAOS_REPORT`.

Definitions (what the closing note of issue 4 quotes):
- lost: a job that is not terminal at the end, or ended in another status than the scenario
  expects (FAILED where it should have completed).
- duplicate training, counted once per occurrence:
  - a step an attempt trained although the checkpoint it resumed from already covered it
    (a restart from step 0 after a checkpoint existed counts every such step);
  - a step an earlier attempt trained beyond its last checkpoint, retrained by the next one
    more than `2 x checkpoint interval + 1` times over (the unavoidable redo is allowed:
    checkpoints upload in the background, so an attempt may be a whole interval past the
    checkpoint still uploading when it ends, and that upload may never arrive);
  - an attempt still recording steps after the next attempt claimed the job (two trainings
    at once);
  - more than one COMPLETED event, or two RUNNING claims of the same attempt number.
- recovery time: seconds from the fault to the job's next recorded training step that
  counts toward its result (see `first_step_after`), the largest over the jobs the fault hit.
  Where a new worker takes over, this includes its cold start (importing torch: 5 to 8 s on
  two busy cores).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.chaos.job_records import TERMINAL, JobsDatabase, JobTrace

REPORT_ENV = "TUNERY_CHAOS_REPORT"


def now() -> datetime:
    """A fault's moment, comparable with the services' timestamps (same host, UTC)."""
    return datetime.now(UTC)


@dataclass
class Duplicates:
    resumed_steps_retrained: int = 0
    excess_redo_steps: int = 0
    concurrent_attempt_steps: int = 0
    extra_completions: int = 0
    double_claims: int = 0

    @property
    def total(self) -> int:
        return (self.resumed_steps_retrained + self.excess_redo_steps
                + self.concurrent_attempt_steps + self.extra_completions + self.double_claims)


def count_duplicates(trace: JobTrace, checkpoint_every: int) -> Duplicates:
    found = Duplicates()
    attempts = trace.attempts_that_trained()
    claims = trace.claims()
    claimed_at: dict[int, datetime] = {}
    for claim in claims:
        claimed_at.setdefault(claim.attempt, claim.at)
    for attempt in attempts:
        steps = trace.trained_steps(attempt)
        resumed = trace.resumed_from(attempt) or 0
        latest_checkpoint_before = max(
            (s for a in attempts if a < attempt for s in trace.checkpoints_saved(a)), default=0
        )
        # Starting below the latest checkpoint an earlier attempt saved is retraining.
        covered = max(resumed, latest_checkpoint_before)
        found.resumed_steps_retrained += sum(1 for s in steps if s <= covered)
        earlier = [a for a in attempts if a < attempt]
        if earlier:
            previous = max(earlier)
            redo = {s for s in trace.trained_steps(previous) if s > resumed} & set(steps)
            found.excess_redo_steps += max(0, len(redo) - (2 * checkpoint_every + 1))
        successor_claim = claimed_at.get(attempt + 1)
        if successor_claim is not None:
            found.concurrent_attempt_steps += sum(
                1 for m in trace.training_metrics(attempt) if m.at > successor_claim
            )
    found.extra_completions = max(0, len(trace.events_to("COMPLETED")) - 1)
    claim_attempts = [e.attempt for e in claims]
    found.double_claims = len(claim_attempts) - len(set(claim_attempts))
    return found


def first_step_after(trace: JobTrace, moment: datetime) -> datetime | None:
    """When the job next trained a step that counts: for a completed job, a step of the
    attempt that completed it (an attempt that went on briefly and then lost its lease did not
    recover anything, nor do its reports flushed late); else any attempt's."""
    attempt = trace.attempt if trace.status == "COMPLETED" else None
    later = [m.at for m in trace.training_metrics(attempt) if m.at > moment]
    return min(later) if later else None


@dataclass
class ScenarioReport:
    """Filled in by a test (jobs, faults), finished with the database's view of the jobs."""

    scenario: str
    checkpoint_every: int
    job_ids: list[str] = field(default_factory=list)
    expected_status: dict[str, str] = field(default_factory=dict)
    faults: list[tuple[str, datetime, list[str]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    written: dict[str, Any] | None = None

    def submitted(self, job_id: str, expect: str = "COMPLETED") -> None:
        self.job_ids.append(job_id)
        self.expected_status[job_id] = expect

    def fault(self, what: str, hits: list[str]) -> datetime:
        """Record a fault injected now that interrupts the jobs `hits`."""
        at = now()
        self.faults.append((what, at, list(hits)))
        return at

    def figures(self, db: JobsDatabase) -> dict[str, Any]:
        traces = {job_id: db.trace(job_id) for job_id in self.job_ids}
        lost = [j for j, t in traces.items()
                if t.status not in TERMINAL or t.status != self.expected_status[j]]
        duplicates = {j: count_duplicates(t, self.checkpoint_every) for j, t in traces.items()}
        recoveries: list[float] = []
        unrecovered = []
        for _, at, hits in self.faults:
            for job_id in hits:
                nxt = first_step_after(traces[job_id], at)
                if nxt is not None:
                    recoveries.append((nxt - at).total_seconds())
                elif traces[job_id].status == "COMPLETED":
                    unrecovered.append(job_id)  # never trained again, yet completed: suspicious
        return {
            "scenario": self.scenario,
            "jobs_submitted": len(self.job_ids),
            "jobs_completed": sum(t.status == "COMPLETED" for t in traces.values()),
            "jobs_lost": len(lost),
            "duplicate_trainings": sum(d.total for d in duplicates.values()),
            "recovery_s": round(max(recoveries), 2) if recoveries else None,
            "attempts": {j: t.attempt for j, t in traces.items()},
            "statuses": {j: t.status for j, t in traces.items()},
            "faults": [what for what, _, _ in self.faults],
            "duplicate_detail": {j: vars(d) for j, d in duplicates.items() if d.total},
            "completed_without_training_after_fault": unrecovered,
            "scenario_wall_s": round(time.monotonic() - self.started, 1),
            **self.extra,
        }

    def write(self, db: JobsDatabase) -> dict[str, Any]:
        """Compute, print and append the figures (once); returns them for assertions."""
        figures = self.figures(db)
        line = json.dumps(figures, sort_keys=True, default=str)
        print(f"CHAOS REPORT {line}")
        target = os.environ.get(REPORT_ENV)
        if target:
            with Path(target).open("a", encoding="utf-8") as out:
                out.write(line + "\n")
        self.written = figures
        return figures
