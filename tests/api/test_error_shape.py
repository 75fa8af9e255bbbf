"""Every 4xx and 5xx is JSON in one shape, {"error": {"code", "message", "fields"}}, and no
stack trace or exception text leaves the server, whatever raised."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from tests.api.conftest import new_key
from tests.conftest import make_payload

SECRET_DETAIL = "token=hunter2 at /srv/tunery/internal.py"


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "fields"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    for item in body["error"]["fields"]:
        assert set(item) == {"path", "message"}
    for leak in ("Traceback", 'File "', SECRET_DETAIL, "RuntimeError", "OperationalError"):
        assert leak not in response.text
    return dict(body["error"])


def _explode() -> None:
    raise RuntimeError(SECRET_DETAIL)


async def _explode_async() -> None:
    raise RuntimeError(SECRET_DETAIL)


def _database_gone() -> None:
    raise OperationalError("SELECT 1", {}, Exception(SECRET_DETAIL))


@pytest.fixture
def exploding_app(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The real app (handlers, middleware) plus routes that fail the ways code can fail."""
    from api.main import create_app
    from shared.settings import get_settings

    # Spent by the shape test's requests; its read of a job draws from the job-reads budget.
    monkeypatch.setenv("TUNERY_RATE_LIMIT_PER_MINUTE", "2")
    get_settings.cache_clear()
    app: FastAPI = create_app()
    app.add_api_route("/test/sync", _explode)
    app.add_api_route("/test/async", _explode_async)
    app.add_api_route("/test/dependency", lambda: None, dependencies=[Depends(_explode)])
    app.add_api_route("/test/database", _database_gone)
    # raise_server_exceptions=False: answer as a server would, not re-raise into the test.
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("path", ["/test/sync", "/test/async", "/test/dependency"])
def test_an_unexpected_exception_is_a_plain_500_and_is_logged(
    exploding_app: TestClient, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="tunery.api"):
        response = exploding_app.get(path)

    error = assert_error(response, 500, "internal_error")
    assert error["message"] == "internal server error"
    assert any(SECRET_DETAIL in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_a_database_outage_is_a_503_with_retry_after(exploding_app: TestClient) -> None:
    response = exploding_app.get("/test/database")

    assert_error(response, 503, "database_unavailable")
    assert response.headers["Retry-After"] == "5"


def test_every_client_error_has_the_one_shape(exploding_app: TestClient) -> None:
    client = exploding_app
    key = {"Authorization": f"Bearer {new_key('shape')}"}
    json_body = {**key, "Content-Type": "application/json"}

    assert_error(client.get("/v1/finetune/llm"), 401, "unauthorized")
    assert_error(client.get("/v1/finetune/llm", headers={"Authorization": "Bearer tun_x_y"}),
                 401, "unauthorized")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get("/v1/finetune/llm/00000000-0000-0000-0000-000000000000",
                            headers=key), 404, "not_found")
    not_allowed = client.delete("/v1/finetune/llm", headers=key)
    assert_error(not_allowed, 405, "method_not_allowed")
    assert not_allowed.headers["Allow"] == "GET, POST"
    invalid = assert_error(client.post("/v1/finetune/llm", json=make_payload(
        training_config={"learning_rate": 7}), headers=key), 422, "invalid_request")
    assert [f["path"] for f in invalid["fields"]] == ["training_config.learning_rate"]
    not_json = assert_error(client.post("/v1/finetune/llm", content=b"\xff{", headers=json_body),
                            422, "invalid_request")
    assert [f["path"] for f in not_json["fields"]] == ["body"]
    too_deep = assert_error(client.post("/v1/finetune/llm", content="[" * 100_000 + "]" * 100_000,
                                        headers=json_body), 422, "invalid_request")
    assert [f["path"] for f in too_deep["fields"]] == ["body"]
    assert_error(client.post("/v1/datasets", content=b"x", headers=json_body), 415,
                 "unsupported_media_type")
    limited = client.get("/v1/finetune/llm", headers=key)
    assert limited.status_code == 429
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1
