"""The same wake-up delivered more than once, to two workers at once, and redelivered by Redis
while the job runs (what an expired visibility_timeout does): the job trains once.

The visibility timeout is not a setting of its own: shared.queue derives it from
TUNERY_LEASE_SECONDS (ten leases), so a running job's message does come back while it runs. The
test makes Redis redeliver the running job's unacknowledged message the way kombu does once
that timeout has passed (`restore_visible`), at a moment of its choosing.
"""

from __future__ import annotations

from kombu import Connection

from tests.chaos.chaos_report import ScenarioReport
from tests.chaos.expectations import assert_completed_once
from tests.chaos.job_records import JobTrace
from tests.chaos.polling import wait_until
from tests.chaos.processes import WorkerProcess
from tests.chaos.stack import ChaosStack


def redeliver_unacked_messages(broker_url: str) -> None:
    """Put every delivered but unacknowledged message back in its queue, as kombu's Redis
    transport does for messages older than the visibility timeout."""
    with Connection(broker_url, transport_options={"visibility_timeout": 0}) as connection:
        connection.default_channel.qos.restore_visible(num=1000)


def deliveries(workers: list[WorkerProcess]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for worker in workers:
        for task_id in worker.received_task_ids():
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def test_duplicate_and_redelivered_wakeups_train_the_job_once(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    stack.start_api()
    workers = stack.start_workers(2)
    with stack.client() as client:
        job_id = stack.submit(client)
    scenario_report.submitted(job_id)
    # The API sent one wake-up; two more copies of it, as a client retry or a reaper would.
    stack.send_wakeup(job_id)
    stack.send_wakeup(job_id)

    stack.wait_for(job_id, "RUNNING", lambda t: t.status == "RUNNING", timeout_s=60)
    # One worker holds the job's message unacknowledged; the idle one takes the two copies.
    wait_until(lambda: sum(deliveries(workers).values()) >= 3, timeout_s=30,
               what="all three wake-ups delivered", on_timeout=lambda: deliveries(workers))
    redeliver_unacked_messages(stack.redis.url)
    wait_until(lambda: max(deliveries(workers).values()) >= 2, timeout_s=30,
               what="the running job's message redelivered",
               on_timeout=lambda: deliveries(workers))
    assert stack.db.status(job_id)[0] == "RUNNING", (
        "the job finished before its message came back: the redelivery tested nothing")

    trace: JobTrace = stack.wait_terminal(job_id, timeout_s=90)
    scenario_report.extra["deliveries"] = sum(deliveries(workers).values())
    scenario_report.write(stack.db)
    detail = stack.describe(job_id)
    assert [c.attempt for c in trace.claims()] == [1], f"claimed more than once\n{detail}"
    assert trace.attempts_that_trained() == [1], detail
    assert len(trace.training_metrics()) == len(set(trace.trained_steps(1))), (
        f"a step was recorded twice\n{detail}")
    assert_completed_once(stack, trace)
    assert all(w.is_alive() for w in workers)
    assert scenario_report.written is not None
    assert scenario_report.written["duplicate_trainings"] == 0, scenario_report.written
