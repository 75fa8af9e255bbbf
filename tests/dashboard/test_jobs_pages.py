"""The dashboard's sign-in, job list and job page in a real browser, against real API and
worker processes training the tiny model."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.dashboard.conftest import PHONE, Dashboard, sign_in
from tests.e2e.conftest import tiny_payload, wait_for_terminal

LOSS_POINTS = "document.getElementById('loss-chart').uplot.data[0].length"
# A function, not an expression: Playwright evaluates an expression with eval(), which the
# page's Content-Security-Policy refuses.
MORE_LOSS_POINTS_THAN = (
    "(n) => (document.getElementById('loss-chart')?.uplot?.data[0].length ?? -1) > n")


def submit(dashboard: Dashboard, model_dir: Path, **training: object) -> str:
    with dashboard.client() as client:
        response = client.post("/v1/finetune/llm", json=tiny_payload(model_dir, **training))
        assert response.status_code == 201, response.text
        return str(response.json()["job_id"])


def test_a_bad_key_shows_the_api_error_on_the_sign_in_page(dashboard: Dashboard,
                                                           page: Page) -> None:
    with dashboard.client("tun_not-a-real-key") as client:
        expected = client.get("/v1/me").json()["error"]["message"]
    page.goto(dashboard.url)
    page.get_by_label("API key").fill("tun_not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text(expected)
    assert page.evaluate("sessionStorage.length") == 0
    assert "tun_not-a-real-key" not in page.url


def test_the_loss_chart_gains_points_from_the_stream_while_the_job_trains_and_the_adapter_downloads(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path, screenshot_dir: Path,
    tmp_path: Path,
) -> None:
    # Two epochs: long enough that the page opens while the job still trains.
    job_id = submit(dashboard, tiny_model_dir, num_train_epochs=2)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    sign_in(page, dashboard.url, dashboard.key)
    assert dashboard.key not in page.url
    assert page.evaluate("document.cookie") == ""
    page.goto(f"{dashboard.url}/#/jobs/{job_id}")
    page.wait_for_function(MORE_LOSS_POINTS_THAN, arg=0, timeout=120_000)
    seen = page.evaluate(LOSS_POINTS)
    # More points without a reload: the page follows the job live.
    page.wait_for_function(MORE_LOSS_POINTS_THAN, arg=seen, timeout=120_000)
    expect(page.locator(".badges")).to_contain_text("COMPLETED", timeout=300_000)
    expect(page.locator("#feed-state")).to_have_text("finished")
    expect(page.locator("[data-stat='Tokens/s'] dd")).not_to_have_text("–")
    for stat in ("Token accuracy", "Eval token accuracy"):
        expect(page.locator(f"[data-stat='{stat}'] dd")).to_have_text(re.compile(r"\d+ %"))
    expect(page.get_by_role("button", name="Download adapter (.tar.gz)")).to_be_visible()
    page.screenshot(path=screenshot_dir / "job.png", full_page=True)
    with dashboard.client() as client:
        metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
        adapter = client.get(
            f"/v1/finetune/llm/{job_id}/artifacts/adapter_model.safetensors").content
    loss_steps = {m["step"] for m in metrics if "loss" in m["values"]}
    expect(page.locator("#loss-chart")).to_be_visible()
    page.wait_for_function(MORE_LOSS_POINTS_THAN, arg=len(loss_steps) - 1)

    # One live path: the job's stream, opened once, and none of the routes it replaces.
    job_path = f"/v1/finetune/llm/{job_id}"
    assert [u for u in requested if "/stream" in u] == [f"{dashboard.url}{job_path}/stream"]
    polled = [u for u in requested if any(
        route in u for route in (f"{job_path}/metrics", f"{job_path}/logs", "/events"))]
    assert polled == []

    with page.expect_download() as downloading:
        page.get_by_role("button", name="Download adapter (.tar.gz)").click()
    saved = tmp_path / "adapter.tar.gz"
    downloading.value.save_as(saved)
    with tarfile.open(saved) as archive:
        member = next(m for m in archive.getmembers()
                      if m.name.endswith("/adapter_model.safetensors"))
        extracted = archive.extractfile(member)
        assert extracted is not None
        assert extracted.read() == adapter

    with page.expect_download() as downloading:
        page.get_by_role("button", name="adapter_config.json").click()
    assert downloading.value.suggested_filename == "adapter_config.json"
    assert b"peft_type" in Path(downloading.value.path()).read_bytes()


def test_the_cancel_button_cancels_a_job(dashboard: Dashboard, page: Page,
                                         tiny_model_dir: Path) -> None:
    job_id = submit(dashboard, tiny_model_dir, num_train_epochs=2)
    sign_in(page, dashboard.url, dashboard.key)
    page.goto(f"{dashboard.url}/#/jobs/{job_id}")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator(".badges")).to_contain_text("CANCELLED", timeout=120_000)
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
    with dashboard.client() as client:
        assert wait_for_terminal(client, job_id)["status"] == "CANCELLED"


def test_the_job_list_shows_status_model_and_progress_and_filters_by_status(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path, screenshot_dir: Path,
) -> None:
    # Many epochs: the job must still be training when the cancel arrives, or it may
    # finish first and be listed COMPLETED.
    job_id = submit(dashboard, tiny_model_dir, num_train_epochs=20)
    with dashboard.client() as client:
        cancelled = client.post(f"/v1/finetune/llm/{job_id}/cancel")
        assert cancelled.is_success, cancelled.text
        assert wait_for_terminal(client, job_id)["status"] == "CANCELLED"
    sign_in(page, dashboard.url, dashboard.key)
    row = page.locator(f"tr[data-job-id='{job_id}']")
    expect(row).to_contain_text("CANCELLED")
    expect(row).to_contain_text(str(tiny_model_dir))
    expect(page.get_by_role("columnheader", name="Tenant")).to_have_count(0)
    page.screenshot(path=screenshot_dir / "jobs.png", full_page=True)

    page.get_by_label("COMPLETED").check()
    page.get_by_role("button", name="Apply filters").click()
    expect(page).to_have_url(f"{dashboard.url}/#/jobs?status=COMPLETED")
    expect(page.locator(f"tr[data-job-id='{job_id}']")).to_have_count(0)
    page.get_by_label("CANCELLED").check()
    page.get_by_role("button", name="Apply filters").click()
    expect(page.locator(f"tr[data-job-id='{job_id}']")).to_have_count(1)


def test_an_admin_key_sees_every_tenants_jobs_with_a_tenant_column(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path,
) -> None:
    job_id = submit(dashboard, tiny_model_dir)
    with dashboard.client() as client:
        tenant = client.get("/v1/me").json()["tenant_id"]
        client.post(f"/v1/finetune/llm/{job_id}/cancel")
    sign_in(page, dashboard.url, dashboard.admin_key)
    expect(page.get_by_role("columnheader", name="Tenant")).to_be_visible()
    expect(page.locator(f"tr[data-job-id='{job_id}'] td.tenant")).to_have_text(tenant)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_another_tenants_job_and_an_unknown_id_show_job_not_found(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path,
) -> None:
    job_id = submit(dashboard, tiny_model_dir)
    with dashboard.client() as client:
        client.post(f"/v1/finetune/llm/{job_id}/cancel")
    sign_in(page, dashboard.url, dashboard.other_key)
    for shown in (job_id, "00000000-0000-0000-0000-000000000000"):
        page.goto(f"{dashboard.url}/#/jobs/{shown}")
        expect(page.get_by_role("heading", name="Job not found")).to_be_visible()
        expect(page.locator("main")).to_contain_text(shown)


def test_the_pages_fit_a_phone_without_horizontal_scrolling(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path, screenshot_dir: Path,
) -> None:
    job_id = submit(dashboard, tiny_model_dir)
    page.set_viewport_size(PHONE)
    sign_in(page, dashboard.url, dashboard.admin_key)
    for name, hash_route, ready in [
        ("jobs", "#/jobs", f"tr[data-job-id='{job_id}']"),
        ("job", f"#/jobs/{job_id}", "#loss-chart .uplot"),
        ("new-job", "#/new", "main h1"),
        ("datasets", "#/datasets", "main h1"),
        ("playground", "#/playground", "main h1"),
        ("webhooks", "#/webhooks", "main h1"),
    ]:
        page.goto(f"{dashboard.url}/{hash_route}")
        page.locator(ready).first.wait_for()
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} scrolls sideways by {overflow}px at 390 px"
        page.screenshot(path=screenshot_dir / f"phone-{name}.png", full_page=True)
    with dashboard.client() as client:
        client.post(f"/v1/finetune/llm/{job_id}/cancel")


# The reader, on a stream the page builds itself, cut at awkward places as a proxy may deliver
# it: the awkward places of a real stream cannot be chosen.
READ_CHUNKED_STREAM = """async (chunks) => {
  const { readEventStream } = await import('/dashboard/js/sse.js');
  const encoder = new TextEncoder();
  const body = new ReadableStream({ start(controller) {
    for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
    controller.close();
  } });
  const events = [];
  await readEventStream(new Response(body), (event) => events.push(event));
  return events;
}"""


def test_the_stream_reader_parses_events_cut_anywhere_as_the_contract_sends_them(
    dashboard: Dashboard, page: Page,
) -> None:
    stream = (
        ": ping\r\n\r\n"
        'event: job\r\ndata: {"status": "RUNNING"}\r\n\r\n'
        'event: metric\nid: s1.l2.m3\ndata: {"step": 1, "values": {"loss": 2.5}}\n\n'
        "event: log\rid: s1.l3.m3\rdata: first\rdata: second\r\r"
        'event: end\nid: s2.l3.m3\ndata: {"status": "COMPLETED"}\n\n'
    )
    page.goto(dashboard.url)
    for size in (1, 3, 7, len(stream)):
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
        events = page.evaluate(READ_CHUNKED_STREAM, chunks)
        assert events == [
            {"type": "job", "data": '{"status": "RUNNING"}', "id": None},
            {"type": "metric", "data": '{"step": 1, "values": {"loss": 2.5}}',
             "id": "s1.l2.m3"},
            {"type": "log", "data": "first\nsecond", "id": "s1.l3.m3"},
            {"type": "end", "data": '{"status": "COMPLETED"}', "id": "s2.l3.m3"},
        ], size
