"""The object store (a moto S3 server process behind a proxy) refusing connections or hung
while jobs train and clients call the API: an outage shorter than the retry deadline costs
no step, a longer one hands the job back to the queue to complete later, and API routes that
need storage answer 503 `storage_unavailable` within seconds instead of hanging."""

from __future__ import annotations

import time

from tests.chaos.chaos_report import ScenarioReport, now
from tests.chaos.expectations import assert_completed_once
from tests.chaos.job_records import JobTrace
from tests.chaos.s3_server import S3Server
from tests.chaos.stack import ChaosStack

# About 80 optimizer steps with a checkpoint every 2: the outage lands mid-run.
EPOCHS = 8
SHORT_OUTAGE_S = 8.0
LONG_DEADLINE_S = 60.0
SHORT_DEADLINE_S = 3.0
LONG_OUTAGE_S = 15.0
# What the API may take to answer while S3 hangs, at 1 s connect / 2 s read timeouts: two
# tries of 2 s plus boto's backoff between them; generous for two busy cores.
API_BOUND_S = 15.0


def past_a_checkpoint(trace: JobTrace) -> bool:
    return trace.status == "RUNNING" and bool(trace.checkpoints_saved(trace.attempt))


def training_past_a_checkpoint(stack: ChaosStack, s3_server: S3Server,
                               scenario_report: ScenarioReport, *, deadline_s: float) -> str:
    """The API and a worker on `s3_server` with a retry deadline of `deadline_s`, and a job
    that has put a checkpoint in S3 and trains on; returns its id."""
    stack.env.update(s3_server.service_env(retry_deadline_s=deadline_s))
    stack.start_api()
    stack.start_worker()
    with stack.client() as client:
        job = stack.submit(client, epochs=EPOCHS)
    scenario_report.submitted(job)
    stack.wait_for(job, "a checkpoint in S3", past_a_checkpoint, timeout_s=120)
    return job


def test_s3_outage_shorter_than_the_deadline_costs_no_step(
    chaos_stack: ChaosStack, s3_server: S3Server, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    job = training_past_a_checkpoint(stack, s3_server, scenario_report, deadline_s=LONG_DEADLINE_S)

    cut_at = scenario_report.fault(f"S3 refusing connections for {SHORT_OUTAGE_S:.0f} s", [job])
    s3_server.proxy.cut()
    time.sleep(SHORT_OUTAGE_S)
    s3_server.proxy.restore()
    restored_at = now()

    trace = stack.wait_terminal(job, timeout_s=240)
    assert_completed_once(stack, trace)
    planned = trace.planned_steps()
    assert planned is not None
    assert trace.attempts_that_trained() == [1], trace.summary()
    assert sorted(trace.trained_steps(1)) == list(range(1, planned + 1)), trace.summary()
    retries = [line for line in trace.log_lines() if line.startswith("storage unavailable, retry")]
    assert retries, trace.summary()
    trained_during = [m.step for m in trace.training_metrics(1) if cut_at < m.at < restored_at]
    scenario_report.extra.update({
        "outage_s": SHORT_OUTAGE_S, "retry_deadline_s": LONG_DEADLINE_S,
        "steps_planned": planned, "steps_trained": len(trace.trained_steps(1)),
        "steps_trained_during_outage": len(trained_during), "retry_log_lines": len(retries),
    })
    figures = scenario_report.write(stack.db)
    # Training went on while the upload waited for S3 (checkpoints upload in the background).
    assert trained_during, trace.summary()
    assert figures["jobs_lost"] == 0 and figures["duplicate_trainings"] == 0, figures


def test_hung_s3_makes_storage_routes_answer_503_within_seconds(
    chaos_stack: ChaosStack, s3_server: S3Server, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    stack.env.update(s3_server.service_env(retry_deadline_s=LONG_DEADLINE_S))
    stack.start_api()
    answers: dict[str, tuple[int, float, str | None]] = {}
    with stack.client(timeout_s=120) as client:
        before = client.post("/v1/datasets", files={
            "file": ("rows.jsonl", b'{"text": "a row"}\n', "application/x-ndjson")})
        assert before.status_code == 201, before.text
        scenario_report.fault("S3 hung (SIGSTOP)", [])
        s3_server.pause()
        try:
            for route, call in {
                "POST /v1/datasets": lambda: client.post("/v1/datasets", files={
                    "file": ("rows.jsonl", b'{"text": "b row"}\n', "application/x-ndjson")}),
                "DELETE /v1/datasets/{id}": lambda: client.delete(
                    f"/v1/datasets/{before.json()['id']}"),
            }.items():
                started = time.monotonic()
                response = call()
                took = time.monotonic() - started
                answers[route] = (response.status_code, round(took, 2),
                                  response.headers.get("Retry-After"))
                print(f"{route} while S3 hangs: {response.status_code} in {took:.2f} s")
                assert response.status_code == 503, (route, response.status_code, response.text)
                assert response.json()["error"]["code"] == "storage_unavailable", response.text
                assert response.headers.get("Retry-After"), response.headers
                assert took < API_BOUND_S, (route, took)
        finally:
            s3_server.resume()
        after = client.post("/v1/datasets", files={
            "file": ("rows.jsonl", b'{"text": "c row"}\n', "application/x-ndjson")})
        assert after.status_code == 201, after.text
    scenario_report.extra["answers_while_hung"] = {
        route: {"status": status, "seconds": took, "retry_after": retry_after}
        for route, (status, took, retry_after) in answers.items()}
    scenario_report.extra["requests_answered_5xx"] = sum(
        status >= 500 for status, _, _ in answers.values())
    scenario_report.write(stack.db)


def test_s3_outage_longer_than_the_deadline_hands_the_job_back_to_complete_later(
    chaos_stack: ChaosStack, s3_server: S3Server, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    job = training_past_a_checkpoint(stack, s3_server, scenario_report, deadline_s=SHORT_DEADLINE_S)
    max_attempts_before = stack.db.row(job)["max_attempts"]

    scenario_report.fault(f"S3 refusing connections for {LONG_OUTAGE_S:.0f} s", [job])
    s3_server.proxy.cut()
    stack.wait_for(
        job, "handed back for storage",
        lambda t: any(e.reason == "storage unavailable: handed back" for e in t.events),
        timeout_s=60)
    time.sleep(max(0.0, LONG_OUTAGE_S - 5))
    s3_server.proxy.restore()

    trace = stack.wait_terminal(job, timeout_s=240)
    assert_completed_once(stack, trace)
    assert not trace.events_to("FAILED"), trace.summary()
    hand_backs = [e for e in trace.events if e.reason == "storage unavailable: handed back"]
    assert hand_backs and all(e.to_status == "QUEUED" for e in hand_backs), trace.summary()
    # Each hand-back gave its attempt back: an outage is no fault of the job.
    assert stack.db.row(job)["max_attempts"] == max_attempts_before + len(hand_backs)
    assert trace.attempt > 1, trace.summary()
    resumed = [trace.resumed_from(a) for a in trace.attempts_that_trained()[1:]]
    assert resumed and all(step for step in resumed), trace.summary()
    scenario_report.extra.update({
        "outage_s": LONG_OUTAGE_S, "retry_deadline_s": SHORT_DEADLINE_S,
        "hand_backs": len(hand_backs), "resumed_from": resumed,
    })
    figures = scenario_report.write(stack.db)
    assert figures["jobs_lost"] == 0 and figures["duplicate_trainings"] == 0, figures
