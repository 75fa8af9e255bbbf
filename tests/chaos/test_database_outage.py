"""PostgreSQL unreachable for a few seconds while a job trains and clients submit: the API
answers 503 with a JSON error (never 500), recovers by itself, and every job it accepted
completes without being trained twice."""

from __future__ import annotations

import time

import httpx

from tests.chaos.chaos_report import ScenarioReport, now
from tests.chaos.expectations import assert_completed_once
from tests.chaos.polling import wait_until
from tests.chaos.stack import ChaosStack, chaos_payload

OUTAGE_S = 5.0
# Steps run faster while reports cannot be written: 16 epochs (about 160 steps) outlast the
# outage, so the database comes back in the middle of the run.
LONG_JOB_EPOCHS = 16


def test_postgres_outage_answers_503_then_recovers_and_loses_no_job(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    stack.start_api()
    worker = stack.start_worker()
    answers: list[int] = []
    with stack.client(timeout_s=20) as client:
        first = stack.submit(client, epochs=LONG_JOB_EPOCHS)
        scenario_report.submitted(first)
        stack.wait_for(first, "training", lambda t: len(t.trained_steps(t.attempt)) >= 3,
                       timeout_s=90)

        cut_at = scenario_report.fault(f"cut PostgreSQL for {OUTAGE_S:.0f} s", [first])
        stack.proxy.cut()
        while (now() - cut_at).total_seconds() < OUTAGE_S:
            for response in (client.post("/v1/finetune/llm", json=chaos_payload(stack.model_dir)),
                             client.get(f"/v1/finetune/llm/{first}")):
                answers.append(response.status_code)
                assert response.status_code == 503, (response.status_code, response.text)
                assert response.json()["error"]["code"] == "database_unavailable", response.text
            time.sleep(0.5)
        stack.proxy.restore()
        restored_at = now()
        at_restore = worker.last_step_logged(first)
        assert at_restore is not None and at_restore[0] < at_restore[1], (
            f"training was not under way when the database came back (step/total "
            f"{at_restore}): the outage did not hit a run")

        def accepted() -> httpx.Response | None:
            response = client.post("/v1/finetune/llm", json=chaos_payload(stack.model_dir))
            answers.append(response.status_code)
            assert response.status_code in (201, 503), (response.status_code, response.text)
            return response if response.status_code == 201 else None

        second = wait_until(accepted, timeout_s=30, interval_s=0.5,
                            what="a submission accepted after the outage").json()["job_id"]
        scenario_report.extra["api_recovered_s"] = round((now() - restored_at).total_seconds(), 2)
        scenario_report.submitted(second)
        assert client.get(f"/v1/finetune/llm/{first}").status_code == 200

    traces = {job_id: stack.wait_terminal(job_id, timeout_s=120) for job_id in (first, second)}
    scenario_report.extra["outage_s"] = OUTAGE_S
    scenario_report.extra["step_when_restored"] = at_restore[0]
    scenario_report.extra["http_answers"] = {str(c): answers.count(c) for c in sorted(set(answers))}
    scenario_report.write(stack.db)
    assert 500 not in answers
    assert answers.count(503) >= 2, answers
    assert sorted(stack.db.job_ids()) == sorted((first, second)), (
        "a submission answered 503 left a job behind, or an accepted one is missing")
    for trace in traces.values():
        assert_completed_once(stack, trace)
    assert scenario_report.written is not None
    assert scenario_report.written["jobs_lost"] == 0
    assert scenario_report.written["duplicate_trainings"] == 0, scenario_report.written
