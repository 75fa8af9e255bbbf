"""Fair share with real workers: two worker processes on PostgreSQL and Redis, tenant A
queues 10 jobs, then tenant B one. B's job takes the next worker that comes free instead of
waiting behind A's eight older queued jobs, and no job is claimed twice.

A's first two jobs, the ones the two workers are busy with when B submits, differ in length
(2 and 8 epochs), so one worker comes free well before the other: with A still running a job
and B none, that worker must take B's. Had both come free at the same moment, A would run
nothing either, and the tie would rightly go to A's older job (`jobs.claim_next`).
"""

from __future__ import annotations

from tests.chaos.chaos_report import ScenarioReport
from tests.chaos.job_records import TERMINAL
from tests.chaos.polling import wait_until
from tests.chaos.stack import ChaosStack

A_JOBS = 10  # TUNERY_MAX_ACTIVE_JOBS_PER_TENANT's default: as many as a tenant may queue
FIRST_EPOCHS, SECOND_EPOCHS, OTHER_EPOCHS = 2, 8, 1


def test_one_tenants_ten_queued_jobs_do_not_hold_back_another_tenants_job(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    stack.start_api()
    stack.start_workers(2)
    b_key = stack.create_key("tenant-b")

    with stack.client() as a_client:
        a_jobs = [stack.submit(a_client, epochs=epochs) for epochs in
                  (FIRST_EPOCHS, SECOND_EPOCHS, *[OTHER_EPOCHS] * (A_JOBS - 2))]
    wait_until(lambda: all(stack.db.status(j)[0] == "RUNNING" for j in a_jobs[:2]),
               timeout_s=120, what="both workers running A's first two jobs",
               on_timeout=lambda: [stack.db.status(j) for j in a_jobs])
    with stack.client(api_key=b_key) as b_client:
        b_job = stack.submit(b_client, epochs=OTHER_EPOCHS)
    for job_id in [*a_jobs, b_job]:
        scenario_report.submitted(job_id)

    for job_id in [*a_jobs, b_job]:
        stack.wait_terminal(job_id, timeout_s=300)
    changes = stack.db.status_changes()
    figures = scenario_report.write(stack.db)

    b_queued = next(i for i, c in enumerate(changes)
                    if c.job_id == b_job and c.to_status == "QUEUED")
    claims = [c.job_id for c in changes if c.to_status == "RUNNING"]
    order = "\n".join(f"{c.to_status:9} {'B' if c.job_id == b_job else 'A'} {c.job_id} "
                      f"attempt {c.attempt} at {c.at}" for c in changes)
    # What the scenario needs to mean anything: B's job was queued while both workers ran A's
    # first two jobs, and A's eight other jobs, all older than B's, were still queued.
    before_b = changes[:b_queued]
    assert [c.job_id for c in before_b if c.to_status == "RUNNING"] == a_jobs[:2], order
    assert not [c for c in before_b if c.to_status in TERMINAL], order

    assert claims[:3] == [*a_jobs[:2], b_job], (
        f"B's job did not take the next free worker\n{order}")
    assert sorted(claims) == sorted([*a_jobs, b_job]), f"a job claimed twice or never\n{order}"
    assert {stack.db.status(j) for j in [*a_jobs, b_job]} == {("COMPLETED", 1)}, order
    assert figures["duplicate_trainings"] == 0, figures
    assert figures["jobs_lost"] == 0, figures
