"""GET /metrics of an in-process app: requests under their route template and status, the
backlog read from the real database and broker, and who may scrape."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.metrics.backlog import BacklogCollector, WaitingMessages
from api.metrics.processes import MULTIPROC_DIR_VARIABLE, metric_files_for
from shared.queue import count_waiting_messages
from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.conftest import make_payload
from tests.prometheus_text import Samples, names, parse_samples, sample

TOKEN = "scrape-token-for-tests"


@pytest.fixture
def scraper(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """An app whose /metrics takes TOKEN, and a client that sends it."""
    monkeypatch.setenv("TUNERY_METRICS_TOKEN", TOKEN)
    get_settings.cache_clear()
    from api.main import create_app

    with TestClient(create_app()) as client:
        yield client


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_samples(response.text)


def requests_counted(samples: Samples, method: str, route: str, status: str) -> float:
    return sample(samples, "tunery_http_requests_total", method=method, route=route,
                  status=status) or 0.0


def test_a_request_is_counted_under_its_route_template_and_status(scraper: TestClient) -> None:
    key = {"Authorization": f"Bearer {new_key('tenant-a')}"}
    job_id = str(uuid.uuid4())
    route = "/v1/finetune/llm/{job_id}"
    before = scrape(scraper)

    assert scraper.get(f"/v1/finetune/llm/{job_id}", headers=key).status_code == 404
    assert scraper.get("/v1/me", headers=key).status_code == 200
    response = scraper.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    after = parse_samples(response.text)

    assert job_id not in response.text
    assert requests_counted(after, "GET", route, "404") == \
        requests_counted(before, "GET", route, "404") + 1
    assert requests_counted(after, "GET", "/v1/me", "200") == \
        requests_counted(before, "GET", "/v1/me", "200") + 1
    timed = sample(after, "tunery_http_request_duration_seconds_count", method="GET", route=route)
    assert timed == (sample(before, "tunery_http_request_duration_seconds_count", method="GET",
                            route=route) or 0.0) + 1
    # The scrape itself is in flight while it is answered.
    assert sample(after, "tunery_http_requests_in_flight") == 1


def test_requests_no_route_serves_or_refused_before_routing_keep_the_label_set_small(
    scraper: TestClient,
) -> None:
    before = scrape(scraper)
    probe = f"/wp-admin/{uuid.uuid4()}"
    assert scraper.get(probe).status_code == 404
    huge = {"Content-Length": str(10**12)}
    assert scraper.post("/v1/finetune/llm", content=b"{}", headers=huge).status_code == 413
    assert scraper.request("BREW", "/healthz").status_code == 405
    response = scraper.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    after = parse_samples(response.text)

    assert "wp-admin" not in response.text
    assert requests_counted(after, "GET", "unmatched", "404") == \
        requests_counted(before, "GET", "unmatched", "404") + 1
    # Refused by the body limit before any route ran: still counted under the route it asked.
    assert requests_counted(after, "POST", "/v1/finetune/llm", "413") == \
        requests_counted(before, "POST", "/v1/finetune/llm", "413") + 1
    assert requests_counted(after, "other", "/healthz", "405") == \
        requests_counted(before, "other", "/healthz", "405") + 1


def test_the_dashboard_s_files_are_counted_under_their_mount_not_one_by_one(
    scraper: TestClient,
) -> None:
    before = scrape(scraper)
    assert scraper.get("/dashboard/js/main.js").status_code == 200
    assert scraper.get("/dashboard/css/dashboard.css").status_code == 200
    assert scraper.get(f"/dashboard/{uuid.uuid4()}.js").status_code == 404
    response = scraper.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    after = parse_samples(response.text)

    assert "main.js" not in response.text
    assert requests_counted(after, "GET", "/dashboard", "200") == \
        requests_counted(before, "GET", "/dashboard", "200") + 2
    assert requests_counted(after, "GET", "/dashboard", "404") == \
        requests_counted(before, "GET", "/dashboard", "404") + 1


def test_jobs_by_state_queue_depth_and_broker_messages_follow_the_database(
    scraper: TestClient,
) -> None:
    key = {"Authorization": f"Bearer {new_key('tenant-a')}"}
    empty = scrape(scraper)
    assert sample(empty, "tunery_database_up") == 1
    assert sample(empty, "tunery_broker_up") == 1
    for state in ("QUEUED", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELLED"):
        assert sample(empty, "tunery_jobs", state=state) == 0

    job_ids = []
    for _ in range(3):
        response = scraper.post("/v1/finetune/llm", json=make_payload(), headers=key)
        assert response.status_code == 201, response.text
        job_ids.append(response.json()["job_id"])
    cancel = scraper.post(f"/v1/finetune/llm/{job_ids[0]}/cancel", headers=key)
    assert cancel.status_code == 200, cancel.text
    after = scrape(scraper)

    assert sample(after, "tunery_jobs", state="QUEUED") == 2
    assert sample(after, "tunery_jobs", state="CANCELLED") == 1
    assert sample(after, "tunery_queue_depth", device_class="train") == 2
    # Each submission sent its wake-up; no worker took one.
    assert sample(after, "tunery_broker_waiting_messages",
                  device_class="train") == count_waiting_messages("train") == 3


def test_a_database_that_is_down_is_a_gauge_not_a_failed_scrape(
    tunery_env: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A PostgreSQL URL on a port nothing listens on: every connection is refused.
    monkeypatch.setenv("TUNERY_DATABASE_URL", "postgresql+psycopg://tunery@127.0.0.1:9/tunery")
    monkeypatch.setenv("TUNERY_AUTO_MIGRATE", "false")
    monkeypatch.setenv("TUNERY_METRICS_TOKEN", TOKEN)
    get_settings.cache_clear()
    from api.main import create_app

    with TestClient(create_app()) as client:
        samples = scrape(client)

    assert sample(samples, "tunery_database_up") == 0
    assert "tunery_jobs" not in names(samples) and "tunery_queue_depth" not in names(samples)
    assert sample(samples, "tunery_broker_up") == 1


def test_a_broker_that_is_down_is_a_gauge_not_a_failed_scrape(
    tunery_env: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing listens there: kombu retries for seconds, longer than the scrape waits.
    monkeypatch.setenv("TUNERY_BROKER_URL", "redis://127.0.0.1:9/0")
    get_settings.cache_clear()
    from prometheus_client import CollectorRegistry, generate_latest

    from shared.migrate import upgrade_database

    upgrade_database(get_settings().database.url)

    registry = CollectorRegistry()
    registry.register(BacklogCollector(waiting=WaitingMessages(patience_s=0.5)))
    samples = parse_samples(generate_latest(registry).decode())

    assert sample(samples, "tunery_broker_up") == 0
    assert "tunery_broker_waiting_messages" not in names(samples)
    assert sample(samples, "tunery_database_up") == 1


def test_metrics_with_a_token_set_need_that_token(scraper: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = scraper.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert "TUNERY_METRICS_TOKEN" in response.json()["error"]["message"]
    # An API key is not the metrics token, an admin's neither.
    key = new_key("tenant-a")
    assert scraper.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_metrics_without_a_token_answer_this_machine_only(tunery_env: Path) -> None:
    from api.main import create_app

    app = create_app()
    with TestClient(app, client=("203.0.113.7", 50000)) as remote:
        response = remote.get("/metrics")
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
        assert "TUNERY_METRICS_TOKEN" in response.json()["error"]["message"]
    with TestClient(app, client=("127.0.0.1", 50000)) as local:
        response = local.get("/metrics")
        assert response.status_code == 200
        assert sample(parse_samples(response.text), "tunery_database_up") == 1


def test_metrics_are_not_in_the_openapi_document(app_client: TestClient) -> None:
    assert "/metrics" not in app_client.get("/openapi.json").json()["paths"]


def test_several_processes_get_a_fresh_directory_one_gets_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, "/somewhere/stale")
    with metric_files_for(1) as none:
        assert none is None
        assert MULTIPROC_DIR_VARIABLE not in os.environ
    with metric_files_for(3) as path:
        assert path is not None and Path(path).is_dir() and not any(Path(path).iterdir())
        assert os.environ[MULTIPROC_DIR_VARIABLE] == path
        (Path(path) / "counter_123.db").write_bytes(b"")
    assert not Path(path).exists()


def test_a_request_that_crashes_is_counted_as_the_500_it_gets(
    tunery_env: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNERY_METRICS_TOKEN", TOKEN)
    get_settings.cache_clear()
    from api.main import create_app

    def crash() -> None:
        raise RuntimeError("a bug")

    app = create_app()
    # A route with a bug, as no real route has one on purpose.
    app.add_api_route("/crash", crash)
    with TestClient(app, raise_server_exceptions=False) as client:
        before = scrape(client)
        assert client.get("/crash").status_code == 500
        after = scrape(client)
    assert requests_counted(after, "GET", "/crash", "500") == \
        requests_counted(before, "GET", "/crash", "500") + 1
