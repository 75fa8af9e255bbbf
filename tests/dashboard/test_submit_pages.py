"""The dashboard's datasets page and new-job form in a real browser, against real API and
worker processes."""

from __future__ import annotations

import json
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.conftest import ALPACA_TEMPLATE, SAMPLE_DATASET
from tests.dashboard.conftest import Dashboard, sign_in
from tests.e2e.conftest import tiny_payload


def test_an_upload_shows_its_progress_columns_first_rows_and_template_preview(
    dashboard: Dashboard, page: Page, tmp_path: Path, screenshot_dir: Path,
) -> None:
    # Large enough that the upload reports progress before it ends.
    rows = [json.loads(line) for line in SAMPLE_DATASET.read_text().splitlines() if line.strip()]
    upload = tmp_path / "alpaca.jsonl"
    upload.write_text("".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(4000)))
    sign_in(page, dashboard.url, dashboard.key)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Datasets").click()
    page.get_by_label("File").set_input_files(upload)
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_label("Upload progress")).to_be_visible()
    expect(page.locator("#upload-progress-text")).to_have_text("100 %", timeout=60_000)
    expect(page.get_by_role("status").filter(has_text="4000 rows")).to_be_visible()
    columns = page.locator("#dataset-columns li")
    expect(columns.first).to_be_visible()
    assert {"instruction", "input", "output"} <= set(columns.all_inner_texts())
    expect(page.locator("#first-rows tbody tr").first).to_contain_text(rows[0]["instruction"])

    page.get_by_label("Prompt template").fill("Q: {question}\nA: {output}")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#missing-columns")).to_contain_text("{question}")
    page.get_by_label("Prompt template").fill(ALPACA_TEMPLATE)
    page.get_by_role("button", name="Preview").click()
    expect(page.locator(".preview-part.completion").first).to_have_text(rows[0]["output"])
    expect(page.locator(".preview-part.prompt").first).to_contain_text(rows[0]["instruction"])
    expect(page.locator("#missing-columns")).to_have_count(0)
    page.screenshot(path=screenshot_dir / "datasets.png", full_page=True)


def test_the_new_job_form_follows_the_api_schema_and_shows_the_apis_message_by_its_field(
    dashboard: Dashboard, page: Page, tiny_model_dir: Path, screenshot_dir: Path,
) -> None:
    with dashboard.client() as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        bad = tiny_payload(tiny_model_dir, learning_rate=5)
        refused = client.post("/v1/finetune/llm", json=bad).json()["error"]["fields"]
    expected = next(f["message"] for f in refused if f["path"] == "training_config.learning_rate")
    sign_in(page, dashboard.url, dashboard.key)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="New job").click()
    for name, field in schema["TrainingConfig"]["properties"].items():
        box = page.locator(f"[data-field='training_config.{name}']")
        expect(box.get_by_text(name, exact=True)).to_be_visible()
        expect(box).to_contain_text(field["description"].split("\n")[0][:60])
        if "default" in field:
            expect(box).to_contain_text(f"default: {json.dumps(field['default'])}")
    page.screenshot(path=screenshot_dir / "new-job.png", full_page=True)

    fill = {
        "model_path": str(tiny_model_dir), "data_path": str(SAMPLE_DATASET),
        "cutoff_len": "128", "num_train_epochs": "0.34", "warmup_steps": "2",
        "learning_rate": "5",
    }
    for name, value in fill.items():
        page.locator(f"[data-field$='.{name}'] input").fill(value)
    page.locator("[data-field='data_config.prompt_template'] textarea").fill(ALPACA_TEMPLATE)
    page.get_by_role("button", name="Submit job").click()
    message = page.locator("[data-error-for='training_config.learning_rate']")
    expect(message).to_have_text(expected)
    expect(page.locator("#field-training_config-learning_rate")).to_be_focused()

    page.locator("#field-training_config-learning_rate").fill("0.005")
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url("**/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[-1]
    with dashboard.client() as client:
        job = client.get(f"/v1/finetune/llm/{job_id}").json()
        client.post(f"/v1/finetune/llm/{job_id}/cancel")
    assert job["payload"]["training_config"]["learning_rate"] == 0.005
    assert job["base_model"] == str(tiny_model_dir)
    assert job["payload"]["data_config"]["cutoff_len"] == 128
