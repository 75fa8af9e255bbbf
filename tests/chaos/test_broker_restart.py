"""Redis killed and restarted empty while one job trains and two wait: their wake-ups are gone,
and the maintenance loop must send new ones. Redis down while clients submit: the submissions
still succeed and run once it is back. Every job completes."""

from __future__ import annotations

import time

from tests.chaos.chaos_report import ScenarioReport, now
from tests.chaos.expectations import assert_completed_once
from tests.chaos.polling import wait_until
from tests.chaos.stack import ChaosStack

QUEUE_KEY = "train"  # kombu's Redis transport keeps the queue `train` in a list of that name


def test_redis_restart_loses_wakeups_and_every_job_still_completes(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    stack.start_api()
    stack.start_worker()
    with stack.client() as client:
        running = stack.submit(client)
        stack.wait_for(running, "RUNNING", lambda t: t.status == "RUNNING", timeout_s=60)
        queued = [stack.submit(client), stack.submit(client)]
    for job_id in (running, *queued):
        scenario_report.submitted(job_id)
    stack.wait_for(running, "training", lambda t: len(t.trained_steps(t.attempt)) >= 3,
                   timeout_s=90)
    waiting = stack.redis.client().llen(QUEUE_KEY)
    assert waiting >= len(queued), f"only {waiting} wake-ups waited in Redis before the restart"
    assert all(stack.db.status(j)[0] == "QUEUED" for j in queued)

    before = stack.redis.client().info("server")["run_id"]
    restarted_at = scenario_report.fault("kill -9 and restart Redis", [running])
    stack.redis.restart()
    # A new server that kept nothing: no snapshot, no append-only file. Counting its messages
    # here would race the maintenance loop, which sends the lost wake-ups again within a
    # second of the restart.
    restarted = stack.redis.client()
    assert restarted.info("server")["run_id"] != before
    assert restarted.config_get("save")["save"] == ""
    assert restarted.config_get("appendonly")["appendonly"] == "no"

    def wakeups_back() -> bool:
        still_queued = sum(stack.db.status(j)[0] == "QUEUED" for j in queued)
        return int(stack.redis.client().llen(QUEUE_KEY)) >= still_queued

    wait_until(wakeups_back, timeout_s=30, what="wake-ups re-sent for the queued jobs",
               on_timeout=lambda: stack.describe(queued[0]))
    scenario_report.extra["wakeups_resent_s"] = round((now() - restarted_at).total_seconds(), 2)

    traces = {job_id: stack.wait_terminal(job_id, timeout_s=120) for job_id in (running, *queued)}
    finished_first = traces[running].events_to("COMPLETED")[0].at
    next_claim = min(traces[j].claims()[0].at for j in queued)
    scenario_report.extra["queued_job_claimed_after_first_completed_s"] = round(
        (next_claim - finished_first).total_seconds(), 2)
    scenario_report.write(stack.db)
    for trace in traces.values():
        assert_completed_once(stack, trace)
        assert trace.attempt == 1, stack.describe(trace.job_id)
    assert scenario_report.written is not None
    assert scenario_report.written["jobs_lost"] == 0
    assert scenario_report.written["duplicate_trainings"] == 0, scenario_report.written


def test_submissions_succeed_while_redis_is_down_and_run_once_it_is_back(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    stack.start_api()
    stack.start_worker()
    down_at = scenario_report.fault("kill -9 Redis, submit, start Redis again", [])
    stack.redis.kill()
    with stack.client() as client:
        started = time.monotonic()
        job_ids = [stack.submit(client, epochs=1), stack.submit(client, epochs=1)]
        submit_s = (time.monotonic() - started) / len(job_ids)
    for job_id in job_ids:
        scenario_report.submitted(job_id)
        assert stack.db.status(job_id)[0] == "QUEUED"
    stack.redis.start()
    back_at = now()

    traces = {job_id: stack.wait_terminal(job_id, timeout_s=120) for job_id in job_ids}
    first_claim = min(trace.claims()[0].at for trace in traces.values())
    scenario_report.extra.update(
        seconds_per_submit_while_down=round(submit_s, 2),
        broker_down_s=round((back_at - down_at).total_seconds(), 2),
        first_claim_after_broker_back_s=round((first_claim - back_at).total_seconds(), 2),
    )
    scenario_report.write(stack.db)
    for trace in traces.values():
        assert_completed_once(stack, trace)
        assert trace.attempt == 1, stack.describe(trace.job_id)
    assert scenario_report.written is not None
    assert scenario_report.written["jobs_lost"] == 0
