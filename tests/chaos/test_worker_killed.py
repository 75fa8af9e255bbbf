"""kill -9 of a worker: mid-epoch (the next attempt resumes from the checkpoint), right after
its claim (the lease set at claim expires and the job is re-queued), and at every attempt (the
job ends FAILED after max_attempts instead of looping)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

from tests.chaos.chaos_report import ScenarioReport, now
from tests.chaos.expectations import assert_completed_once
from tests.chaos.job_records import JobTrace
from tests.chaos.polling import wait_until
from tests.chaos.stack import ChaosStack

# Mid-epoch of the chaos job's 4 epochs of about 10 steps each, past several checkpoints.
KILL_AT_STEP = 15
# Reaching the database and starting a Python process take this much on two busy cores.
SLACK_S = 3.0


def running(attempt: int) -> str:
    return f"RUNNING attempt {attempt}"


def is_running(attempt: int) -> Callable[[JobTrace], bool]:
    return lambda trace: trace.status == "RUNNING" and trace.attempt == attempt


def test_worker_killed_mid_epoch_resumes_from_its_checkpoint_on_a_new_worker(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack, every = chaos_stack, chaos_stack.timings.checkpoint_every_steps
    stack.start_api()
    first = stack.start_worker()
    with stack.client() as client:
        job_id = stack.submit(client)
    scenario_report.submitted(job_id)

    def past_a_checkpoint(trace: JobTrace) -> bool:
        steps = trace.trained_steps(trace.attempt)
        return (trace.status == "RUNNING" and bool(trace.checkpoints_saved(trace.attempt))
                and bool(steps) and max(steps) >= KILL_AT_STEP)

    before = stack.wait_for(job_id, f"step {KILL_AT_STEP} after a checkpoint",
                            past_a_checkpoint, timeout_s=90, interval_s=0.05)
    killed_attempt = before.attempt
    scenario_report.fault("kill -9 the worker mid-epoch", [job_id])
    first.kill()
    stack.start_worker()

    trace = stack.wait_terminal(job_id, timeout_s=90)
    logged_checkpoint = max(trace.checkpoints_saved(killed_attempt), default=0)
    resumed = trace.resumed_from(killed_attempt + 1)
    past_checkpoint = [s for s in trace.trained_steps(killed_attempt) if s > (resumed or 0)]
    scenario_report.extra.update(killed_at_step=max(before.trained_steps(killed_attempt)),
                                 resumed_from_step=resumed,
                                 steps_trained_past_checkpoint=len(past_checkpoint))
    scenario_report.write(stack.db)
    detail = stack.describe(job_id)
    assert killed_attempt == 1, (
        f"attempt 1 was not the one running at step {KILL_AT_STEP}:\n{detail}")
    assert trace.attempt == 2, f"expected exactly one more attempt\n{detail}"
    # A checkpoint whose log line the kill cut off may be newer than the last one logged.
    assert resumed is not None and logged_checkpoint <= resumed <= max(trace.trained_steps(1)), (
        f"attempt 2 resumed from {resumed}; attempt 1 logged a checkpoint at "
        f"{logged_checkpoint}\n{detail}")
    assert len(past_checkpoint) <= every + 1, (
        f"attempt 1 trained {past_checkpoint} past the checkpoint of step {resumed}")
    assert trace.trained_steps(2)[0] == resumed + 1, detail
    assert_completed_once(stack, trace)
    assert scenario_report.written is not None
    assert scenario_report.written["jobs_lost"] == 0
    assert scenario_report.written["duplicate_trainings"] == 0, scenario_report.written


def test_worker_killed_before_its_first_heartbeat_is_requeued_within_lease_and_reaper_interval(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack, timings = chaos_stack, chaos_stack.timings
    stack.start_api()
    first = stack.start_worker()
    with stack.client() as client:
        job_id = stack.submit(client)
    scenario_report.submitted(job_id)

    claimed = stack.wait_for(job_id, running(1), is_running(1), timeout_s=60, interval_s=0.02)
    scenario_report.fault("kill -9 the worker right after its claim", [job_id])
    first.kill()
    claim_at = claimed.claims()[0].at
    lease_at_kill = stack.db.row(job_id)["lease_expires_at"]
    # As a worker on another host sees it: one on this host would release the dead pid's
    # lease at its start (tests/worker/test_gone_workers.py) instead of waiting for it.
    stack.start_worker(TUNERY_RELEASE_DEAD_LOCAL_WORKERS="false")
    # Its start-up (importing torch and transformers) takes seconds, more on a busy machine:
    # the sweep that re-queues the job runs from here on.
    ready_at = now()

    requeued = stack.wait_for(job_id, "re-queued", lambda t: bool(t.events_to("QUEUED")[1:]),
                              timeout_s=60)
    trace = stack.wait_terminal(job_id, timeout_s=90)
    requeue = requeued.events_to("QUEUED")[1]
    requeued_after_s = (requeue.at - claim_at).total_seconds()
    scenario_report.extra["requeued_after_claim_s"] = round(requeued_after_s, 2)
    scenario_report.write(stack.db)
    detail = stack.describe(job_id)
    assert lease_at_kill - claim_at <= timedelta(seconds=timings.lease_seconds + 0.2), (
        f"the lease was renewed before the kill ({lease_at_kill} vs claim {claim_at}): the kill "
        "came after the first heartbeat")
    assert "lease" in (requeue.reason or ""), requeue
    assert requeue.attempt == 1, detail
    # Never before the lease expired; then within a sweep of the lease's expiry or of the new
    # worker's start, whichever came later.
    assert requeue.at >= lease_at_kill, detail
    due = max(lease_at_kill, ready_at)
    late_s = (requeue.at - due).total_seconds()
    bound = timings.reaper_interval_s + SLACK_S
    assert late_s <= bound, (
        f"re-queued {late_s:.1f} s after the lease expired and the new worker was ready; "
        f"reaper interval + slack is {bound:.1f} s\n{detail}")
    assert trace.attempt == 2, detail
    assert_completed_once(stack, trace)
    assert scenario_report.written is not None
    assert scenario_report.written["duplicate_trainings"] == 0, scenario_report.written


def test_job_that_kills_its_worker_every_time_fails_after_max_attempts_without_looping(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack, timings = chaos_stack, chaos_stack.timings
    stack.start_api()
    worker = stack.start_worker()
    with stack.client() as client:
        job_id = stack.submit(client)
    scenario_report.submitted(job_id, expect="FAILED")

    for attempt in range(1, timings.max_attempts + 1):
        # The replacement worker re-queues the job once the lease expires, then claims it.
        stack.wait_for(job_id, running(attempt), is_running(attempt),
                       timeout_s=60, interval_s=0.02)
        scenario_report.fault(f"kill -9 the worker of attempt {attempt}", [])
        worker.kill()
        worker = stack.start_worker()
    last_kill = scenario_report.faults[-1][1]

    trace = stack.wait_terminal(job_id, timeout_s=60)
    failed_after_s = (trace.events_to(trace.status)[-1].at - last_kill).total_seconds()
    scenario_report.extra["failed_after_last_kill_s"] = round(failed_after_s, 2)
    # Loop or not shows only over time: give the live worker several sweeps to misbehave.
    watch_until = now() + timedelta(seconds=3 * timings.reaper_interval_s + 1)
    wait_until(lambda: now() >= watch_until or stack.db.trace(job_id).attempt > trace.attempt,
               timeout_s=30, what="the watch window to pass", interval_s=0.2)
    after = stack.db.trace(job_id)
    scenario_report.write(stack.db)
    detail = stack.describe(job_id)
    assert trace.status == "FAILED", detail
    assert trace.attempt == timings.max_attempts, detail
    error = trace.row["error"] or ""
    assert re.search(rf"\b{timings.max_attempts} attempts\b", error), (
        f"the reason does not name the attempts: {error!r}")
    assert after.status == "FAILED" and after.attempt == timings.max_attempts, (
        f"the job moved on after FAILED:\n{after.summary()}")
    assert [c.attempt for c in after.claims()] == list(range(1, timings.max_attempts + 1)), detail
    assert worker.is_alive(), worker.log_tail()
