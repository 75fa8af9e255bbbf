"""Browser fixtures: Debian's chromium driven by Playwright, against one real API and worker
stack per module (starting one per test would cost more than the tests themselves)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from cli.local_stack import LocalStack
from shared.settings import PROJECT_ROOT
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import create_key, stack_env

# Playwright's own browser download is not reachable from here: Debian's chromium is used,
# which `make test` installs.
CHROMIUM = Path("/usr/bin/chromium")
PHONE = {"width": 390, "height": 844}


@dataclass
class Dashboard:
    stack: LocalStack
    env: dict[str, str]
    key: str
    other_key: str
    admin_key: str

    @property
    def url(self) -> str:
        return self.stack.base_url

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {key or self.key}"})


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory,
              tiny_model_dir: Path) -> Iterator[Dashboard]:
    root = tmp_path_factory.mktemp("dashboard")
    # The tests poll the JSON routes while jobs train.
    env = stack_env(root / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_RATE_LIMIT_PER_MINUTE="0",
                    # The webhooks page's test endpoint is a receiver on this machine.
                    TUNERY_ALLOW_HTTP_URLS="true",
                    TUNERY_ALLOWED_PRIVATE_URL_HOSTS='["127.0.0.1"]')
    stack = LocalStack(env=env, log_dir=root / "logs")
    stack.__enter__()
    try:
        yield Dashboard(stack, env, key=create_key(env, "alice"),
                        other_key=create_key(env, "bob"),
                        admin_key=create_key(env, "operator", admin=True))
    finally:
        stack.stop()
        for log in sorted((root / "logs").glob("*.log")):
            print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-6000:]}")


# Per module, not per session: Playwright's sync API keeps an asyncio loop running on this
# thread while it lives, and every later test that calls asyncio.run() (the inference
# engine's) would fail with "cannot be called from a running event loop".
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (CI containers), where chromium's sandbox
        # refuses to start.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page raised: {errors}"


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    folder = Path(os.environ.get("TUNERY_SCREENSHOT_DIR", PROJECT_ROOT / "build" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sign_in(page: Page, url: str, key: str) -> None:
    page.goto(url)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name="Sign out").wait_for()
