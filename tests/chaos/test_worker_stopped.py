"""A worker told to stop while it trains: SIGTERM (Celery's warm shutdown, what Docker and
Kubernetes send first) or SIGQUIT (the cold shutdown, what a second Ctrl-C becomes).

The worker ends the step it is in, saves its checkpoint and hands its job back: the job returns
to QUEUED with its lease released within seconds, and the next worker resumes it from that very
step, so no step is trained twice. A job whose cancel was asked ends CANCELLED. A worker's stop
never makes a job FAILED."""

from __future__ import annotations

import signal

import pytest

from tests.chaos.chaos_report import ScenarioReport
from tests.chaos.expectations import assert_completed_once
from tests.chaos.job_records import JobTrace
from tests.chaos.stack import ChaosStack

# Past a checkpoint and well before the chaos job's last step.
STOP_AT_STEP = 5
# Seconds a stopped worker may take to hand its job back and exit: a heartbeat, a micro-batch
# and the process's teardown, on two busy cores. A bound against hanging, never a timing test.
EXIT_WITHIN_S = 60
# What an operator can count on between SIGTERM and the job being back in the queue: a
# heartbeat, the rest of a tiny model's step and its checkpoint.
QUEUED_WITHIN_S = 5
SHUTDOWNS = [pytest.param(signal.SIGTERM, id="warm-SIGTERM"),
             pytest.param(signal.SIGQUIT, id="cold-SIGQUIT")]


def past_a_checkpoint(trace: JobTrace) -> bool:
    steps = trace.trained_steps(trace.attempt)
    return (trace.status == "RUNNING" and bool(trace.checkpoints_saved(trace.attempt))
            and bool(steps) and max(steps) >= STOP_AT_STEP)


@pytest.mark.parametrize("shutdown", SHUTDOWNS)
def test_a_stopped_worker_hands_its_job_back_and_the_next_worker_resumes_it(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport, shutdown: signal.Signals
) -> None:
    stack = chaos_stack
    stack.start_api()
    first = stack.start_worker()
    with stack.client() as client:
        job_id = stack.submit(client)
    scenario_report.submitted(job_id)
    stack.wait_for(job_id, f"step {STOP_AT_STEP} after a checkpoint", past_a_checkpoint,
                   timeout_s=90, interval_s=0.05)

    signalled = scenario_report.fault(f"{shutdown.name} to the worker mid-epoch", [job_id])
    first.send(shutdown)
    first.wait_exit(EXIT_WITHIN_S)
    handed_back = stack.db.trace(job_id)
    detail = stack.describe(job_id)
    assert handed_back.status == "QUEUED", detail
    queued_after_s = (handed_back.events_to("QUEUED")[-1].at - signalled).total_seconds()
    scenario_report.extra["queued_after_s"] = round(queued_after_s, 2)
    assert queued_after_s <= QUEUED_WITHIN_S, detail
    # The step the worker stopped at is the checkpoint it handed back.
    stopped_at = max(handed_back.trained_steps(1))
    assert max(handed_back.checkpoints_saved(1)) == stopped_at, detail
    assert handed_back.row["lease_owner"] is None, detail
    assert handed_back.row["lease_expires_at"] is None, detail
    assert any("worker stopping: job handed back" in line
               for line in handed_back.log_lines(1)), detail

    stack.start_worker()
    trace = stack.wait_terminal(job_id, timeout_s=90)
    trained_twice = set(trace.trained_steps(1)) & set(trace.trained_steps(2))
    scenario_report.extra["resumed_from_step"] = trace.resumed_from(2)
    scenario_report.extra["steps_trained_twice"] = len(trained_twice)
    scenario_report.write(stack.db)
    detail = stack.describe(job_id)
    assert trace.attempt == 2, detail
    assert trace.resumed_from(2) == stopped_at, detail
    assert not trained_twice, detail
    assert_completed_once(stack, trace)
    # The hand-back cost the job none of its attempts against worker crashes.
    assert trace.row["max_attempts"] == stack.timings.max_attempts + 1, detail


@pytest.mark.parametrize("shutdown", SHUTDOWNS)
def test_a_cancelled_job_whose_worker_stops_ends_cancelled(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport, shutdown: signal.Signals
) -> None:
    stack = chaos_stack
    stack.start_api()
    first = stack.start_worker()
    with stack.client() as client:
        job_id = stack.submit(client)
        scenario_report.submitted(job_id, expect="CANCELLED")
        stack.wait_for(job_id, f"step {STOP_AT_STEP} after a checkpoint", past_a_checkpoint,
                       timeout_s=90, interval_s=0.05)
        cancel = client.post(f"/v1/finetune/llm/{job_id}/cancel")
        assert cancel.status_code == 200, cancel.text
    # At once, before the worker's next heartbeat reads the cancel.
    scenario_report.fault(f"cancel, then {shutdown.name} to the worker", [job_id])
    first.send(shutdown)
    first.wait_exit(EXIT_WITHIN_S)

    trace = stack.db.trace(job_id)
    scenario_report.write(stack.db)
    detail = stack.describe(job_id)
    assert trace.status == "CANCELLED", detail
    assert trace.attempt == 1, detail
    assert "cancelled" in (trace.row["error"] or ""), detail
