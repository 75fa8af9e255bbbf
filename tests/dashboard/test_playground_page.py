"""The playground in a real browser, against real API, worker and embedded inference engine
processes: a model trained by a tiny job and its base model answer the same message side by
side, each with its own answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from playwright.sync_api import Page, expect

from cli.local_stack import LocalStack, free_port
from tests.conftest import ASSETS_DIR
from tests.dashboard.conftest import sign_in
from tests.e2e.conftest import create_key, stack_env
from tests.e2e.test_inference_client import chat_file
from tests.e2e.test_openai_client import wait_for

MESSAGE = "Say the number 7."
MAX_TOKENS = 256
"""What the playground asks for (api/dashboard/static/js/pages/playground.js)."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           tiny_model_dir: Path) -> Iterator[tuple[LocalStack, str]]:
    root = tmp_path_factory.mktemp("playground")
    env = stack_env(root / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_RATE_LIMIT_PER_MINUTE="0",
                    TUNERY_INFERENCE_BASE_MODELS=json.dumps([str(tiny_model_dir)]))
    # A free port for the engine: another stack on this machine may hold the default one.
    stack = LocalStack(env=env, log_dir=root / "logs", inference=True, engine_port=free_port())
    stack.__enter__()
    try:
        yield stack, create_key(stack.env, "playground")
    finally:
        stack.stop()
        for log in sorted((root / "logs").glob("*.log")):
            print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-6000:]}")


def test_a_trained_model_and_its_base_answer_side_by_side(
    served: tuple[LocalStack, str], page: Page, tiny_model_dir: Path, tmp_path: Path,
    screenshot_dir: Path,
) -> None:
    stack, key = served
    client = OpenAI(api_key=key, base_url=f"{stack.base_url}/v1", max_retries=0)
    training = client.files.create(file=chat_file(tmp_path / "train.jsonl", 40).open("rb"),
                                   purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=training.id, suffix="terse", seed=5,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 12, "batch_size": 4, "learning_rate_multiplier": 10}}})
    done = wait_for(client, job.id, lambda j: j.status in ("succeeded", "failed"), 600)
    assert done.status == "succeeded", done.error
    tuned, base = done.fine_tuned_model, str(tiny_model_dir)
    assert tuned is not None
    # The answers the API gives for the request the page sends: greedy, so the page must show
    # exactly these. (Without the training data's system message the taught style shows only
    # in part, so the answers are compared, not their text.)
    expected = {}
    for model in (tuned, base):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": MESSAGE}],
            max_tokens=MAX_TOKENS, temperature=0)
        expected[model] = answer.choices[0].message.content or ""
    assert expected[tuned] != expected[base]

    sign_in(page, stack.base_url, key)
    page.goto(f"{stack.base_url}/#/playground")
    expect(page.locator("#model-left")).to_have_value(tuned)
    expect(page.locator("#model-right")).to_have_value(base)
    page.get_by_label("Temperature").fill("0")
    page.get_by_role("textbox", name="Message").fill(MESSAGE)
    page.get_by_role("button", name="Send to both").click()
    for side, model in (("Fine-tuned model", tuned), ("Base model", base)):
        conversation = page.get_by_role("log", name=f"{side} conversation")
        answer = conversation.locator(".bubble.assistant:not(.muted)")
        expect(answer).to_have_count(1, timeout=120_000)
        expect(conversation.locator(".bubble.user")).to_have_text(MESSAGE)
        assert answer.text_content() == expected[model], side
    page.screenshot(path=screenshot_dir / "playground.png", full_page=True)
