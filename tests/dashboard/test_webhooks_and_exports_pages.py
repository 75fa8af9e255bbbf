"""The webhooks page and the job page's Export button in a real browser, against real API and
worker processes: an endpoint on this machine receives the test events the page sends, and a
worker builds the export the page asks for."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page, expect

from tests.dashboard.conftest import Dashboard, sign_in
from tests.dashboard.test_jobs_pages import submit
from tests.e2e.conftest import wait_for_terminal
from tests.webhook_receiver import receiver, signed_by


def test_a_webhook_endpoint_shows_its_secret_once_and_its_test_attempts_then_is_deleted(
    dashboard: Dashboard, page: Page, screenshot_dir: Path,
) -> None:
    # Bob submits no jobs here: the only deliveries are the page's test sends.
    with receiver(statuses=[500]) as hooks:
        sign_in(page, dashboard.url, dashboard.other_key)
        page.get_by_role("link", name="Webhooks").click()
        page.get_by_label("URL").fill(hooks.url)
        page.get_by_label("Name (optional)").fill("build hooks")
        page.get_by_role("button", name="Add endpoint").click()
        secret = page.locator("#new-secret").text_content() or ""
        assert secret.startswith("whsec_")
        row = page.locator("tr[data-endpoint-id]")
        expect(row).to_have_count(1)
        expect(row).to_contain_text("build hooks")
        endpoint_id = row.get_attribute("data-endpoint-id")

        # A 500 is an answer, not a delivery: shown as an error.
        for answer, role in (("500", "alert"), ("200", "status")):
            row.get_by_role("button", name="Send test").click()
            expect(page.get_by_role(role).filter(has_text="answered")).to_contain_text(
                f"with {answer}.")
        attempts = page.locator("tr[data-attempt-id]")
        expect(attempts).to_have_count(2)
        page.screenshot(path=screenshot_dir / "webhooks.png", full_page=True)
        assert len(hooks.received) == 2
        assert all(signed_by(received, secret) for received in hooks.received)

    with dashboard.client(dashboard.other_key) as client:
        listed = client.get(f"/v1/webhook_endpoints/{endpoint_id}/attempts").json()["data"]
    assert [a["id"] for a in listed] == [a.get_attribute("data-attempt-id")
                                         for a in attempts.all()]
    assert [str(a["status_code"]) for a in listed] == ["200", "500"]
    expect(attempts.first).to_contain_text("200")
    expect(attempts.last).to_contain_text("500")

    # Shown once: the page read again has only the API's hint of it.
    page.reload()
    expect(row).to_have_count(1)
    assert secret not in page.content()

    row.get_by_role("button", name="Delete").click()
    row.get_by_role("button", name="Confirm delete").click()
    expect(page.locator("tr[data-endpoint-id]")).to_have_count(0)
    with dashboard.client(dashboard.other_key) as client:
        assert client.get("/v1/webhook_endpoints").json()["data"] == []


def test_the_export_button_asks_for_a_merged_model_and_shows_its_files_once_built(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path,
) -> None:
    job_id = submit(dashboard, tiny_model_dir)
    with dashboard.client() as client:
        assert wait_for_terminal(client, job_id)["status"] == "COMPLETED"
    sign_in(page, dashboard.url, dashboard.key)
    page.goto(f"{dashboard.url}/#/jobs/{job_id}")
    page.get_by_label("Export as").select_option(label="Merged model (safetensors)")
    page.get_by_role("button", name="Export", exact=True).click()
    exported = page.locator("#exports li")
    expect(exported).to_have_count(1)
    expect(exported).to_contain_text("COMPLETED", timeout=300_000)

    with dashboard.client() as client:
        (export,) = client.get(f"/v1/finetune/llm/{job_id}/exports").json()["exports"]
    assert export["format"] == "merged" and export["status"] == "COMPLETED"
    assert export["artifacts"]
    expect(exported).to_have_attribute("data-export", export["export_id"])
    for name in export["artifacts"]:
        expect(exported.get_by_role("button", name=name, exact=True)).to_be_visible()
