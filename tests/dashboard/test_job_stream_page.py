"""The job page follows its job through the stream alone: a connection cut mid-job is resumed
where it stopped, and a job with thousands of rows opens with all of them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, Route, expect
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import make_engine
from tests.dashboard.conftest import Dashboard, sign_in
from tests.dashboard.test_jobs_pages import submit
from tests.e2e.conftest import wait_for_terminal

LOG_LINES_KEPT = 400
"""The lines the page's log tail keeps (api/dashboard/static/js/pages/job.js)."""

LONGEST_TASK_MS = """() => new Promise((resolve) => {
  let longest = 0;
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) longest = Math.max(longest, entry.duration);
  }).observe({ type: "longtask", buffered: true });
  setTimeout(() => resolve(longest), 500);
})"""


def wait_for_metrics(client: httpx.Client, job_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]:
        assert time.monotonic() < deadline, "the job wrote no metrics"
        time.sleep(0.5)


def cut_stream_start(client: httpx.Client, job_id: str, log_events: int) -> tuple[str, str]:
    """The real stream's start up to its `log_events`-th log event, and half of the event after
    it, as a connection that drops mid-event leaves it; and the id of the last whole event."""
    blocks: list[str] = []
    with client.stream("GET", f"/v1/finetune/llm/{job_id}/stream") as response:
        assert response.status_code == 200
        text = ""
        for chunk in response.iter_text():
            text += chunk
            *whole, text = text.split("\n\n")
            blocks += [b for b in whole if not b.startswith(":")]
            logs = [i for i, b in enumerate(blocks) if b.startswith("event: log\n")]
            if len(logs) > log_events:
                break
    kept = blocks[:logs[log_events - 1] + 1]
    last_id = next(line[4:] for b in reversed(kept) for line in b.split("\n")
                   if line.startswith("id: "))
    following = blocks[len(kept)]
    return "".join(f"{b}\n\n" for b in kept) + following[:len(following) // 2], last_id


def test_a_stream_cut_mid_job_is_resumed_with_last_event_id_and_shows_each_log_line_once(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path,
) -> None:
    job_id = submit(dashboard, tiny_model_dir, num_train_epochs=2)
    with dashboard.client() as client:
        wait_for_metrics(client, job_id)
        start, last_id = cut_stream_start(client, job_id, log_events=3)

    # The page's connections to the stream, in order: the first gets the real stream's start
    # and then drops, the second fails as a network does, the rest reach the API.
    asked: list[str | None] = []
    held: list[Route] = []

    def stream(route: Route) -> None:
        asked.append(route.request.headers.get("last-event-id"))
        if len(asked) == 1:
            route.fulfill(status=200, body=start,
                          headers={"Content-Type": "text/event-stream"})
        elif len(asked) == 2:
            held.append(route)
        else:
            route.continue_()

    page.route(f"**/v1/finetune/llm/{job_id}/stream", stream)
    sign_in(page, dashboard.url, dashboard.key)
    page.goto(f"{dashboard.url}/#/jobs/{job_id}")
    expect(page.locator("#feed-state")).to_have_text("reconnecting…")
    deadline = time.monotonic() + 30
    while not held:
        assert time.monotonic() < deadline, f"no reconnection after {asked}"
        page.wait_for_timeout(100)
    assert asked == [None, last_id]
    expect(page.locator("#feed-state")).to_have_text("reconnecting…")
    held[0].abort("connectionreset")

    expect(page.locator("#feed-state")).to_have_text("live", timeout=60_000)
    expect(page.locator("#feed-state")).to_have_text("finished", timeout=300_000)
    assert asked == [None, last_id, last_id]
    with dashboard.client() as client:
        assert wait_for_terminal(client, job_id)["status"] == "COMPLETED"
        lines = client.get(f"/v1/finetune/llm/{job_id}/logs",
                           params={"n_lines": 10_000}).json()["logs"]
    # Every line fits the tail, so the tail shows the whole log.
    assert 3 < len(lines) <= LOG_LINES_KEPT
    assert page.locator("#log-tail").text_content() == "".join(f"{line}\n" for line in lines)
    expect(page.locator(".badges")).to_contain_text("COMPLETED")


def test_a_job_with_thousands_of_rows_opens_with_every_point_and_the_last_log_lines(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path,
) -> None:
    job_id = submit(dashboard, tiny_model_dir)
    with dashboard.client() as client:
        client.post(f"/v1/finetune/llm/{job_id}/cancel")
        wait_for_terminal(client, job_id)
    # A long job's history, written as the worker writes it, into the stack's own database.
    steps = 2500
    engine = make_engine(f"sqlite:///{dashboard.env['TUNERY_DATA_DIR']}/tunery.db")
    try:
        with Session(engine) as session:
            for step in range(1, steps + 1):
                jobs.record_metric(session, job_id, 1, step, {
                    "loss": 3 / step, "learning_rate": 1e-4, "total_steps": steps})
                jobs.append_log(session, job_id, 1, f"step {step}/{steps} loss {3 / step:.4f}")
            session.commit()
    finally:
        engine.dispose()

    sign_in(page, dashboard.url, dashboard.key)
    page.goto(f"{dashboard.url}/#/jobs/{job_id}")
    expect(page.locator("#feed-state")).to_have_text("finished", timeout=120_000)
    expect(page.locator("[data-stat='Step'] dd")).to_have_text(f"{steps} / {steps}")
    with dashboard.client() as client:
        metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
    # With the rows of whatever steps the job ran before its cancel.
    loss_steps = {m["step"] for m in metrics if {"loss", "eval_loss"} & set(m["values"])}
    assert len(loss_steps) >= steps
    assert page.evaluate("() => document.getElementById('loss-chart').uplot.data[0].length") \
        == len(loss_steps)
    shown = [f"step {s}/{steps} loss {3 / s:.4f}" for s in range(1, steps + 1)]
    assert page.locator("#log-tail").text_content() == "".join(
        f"{line}\n" for line in shown[-LOG_LINES_KEPT:])
    # Reported, not judged: the longest stretch the page could not answer input.
    print(f"longest task while {2 * steps} rows arrived: {page.evaluate(LONGEST_TASK_MS)} ms")
