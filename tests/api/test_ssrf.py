"""Submitting a job whose data_path or model_path would make Tunery fetch from an internal
address is a 422 naming the field, before anything is stored or queued."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from shared.settings import get_settings
from tests.conftest import make_payload

HOSTILE_DATA_URLS = [
    "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://localhost/train.jsonl",
    "https://127.0.0.1/train.jsonl",
    "https://2130706433/train.jsonl",
    "https://0x7f000001/train.jsonl",
    "https://017700000001/train.jsonl",
    "https://0177.0.0.1/train.jsonl",
    "https://0x7f.1/train.jsonl",
    "https://127.1/train.jsonl",
    "https://[::1]/train.jsonl",
    "https://[::ffff:127.0.0.1]/train.jsonl",
    "https://[::ffff:169.254.169.254]/train.jsonl",
    "https://[64:ff9b::a9fe:a9fe]/train.jsonl",
    "https://0.0.0.0/train.jsonl",
    "https://[::]/train.jsonl",
    "https://10.0.0.1/train.jsonl",
    "https://192.168.1.1/train.jsonl",
    "https://172.16.0.1/train.jsonl",
    "https://100.64.0.1/train.jsonl",
    "https://[fe80::1]/train.jsonl",
    "https://[fd00:ec2::254]/latest/meta-data/",
    "https://224.0.0.1/train.jsonl",
    "http://example.com/train.jsonl",
    "file:///etc/passwd",
    "gopher://example.com/_GET%20/",
    "https://user:hunter2@example.com/train.jsonl",
    "https://no-such-host.invalid/train.jsonl",
]


def _problem(client: TestClient, data_path: str | None = None,
             model_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> dict[str, str]:
    response = client.post("/v1/finetune/llm",
                           json=make_payload(model_path=model_path, data_path=data_path))
    assert response.status_code == 422, response.text
    [problem] = response.json()["error"]["fields"]
    return problem  # type: ignore[no-any-return]


@pytest.mark.parametrize("url", HOSTILE_DATA_URLS)
def test_hostile_data_url_is_a_422_naming_data_path(client: TestClient, url: str) -> None:
    problem = _problem(client, data_path=url + "?X-Amz-Signature=secret")

    assert problem["path"] == "data_config.data_path"
    assert "secret" not in problem["message"] and "hunter2" not in problem["message"]
    assert client.get("/v1/finetune/llm").json()["total"] == 0


def test_a_host_that_does_not_resolve_says_so(client: TestClient) -> None:
    problem = _problem(client, data_path="https://no-such-host.invalid/train.jsonl")

    assert "does not resolve" in problem["message"]


def test_a_model_path_url_is_refused(client: TestClient) -> None:
    problem = _problem(client, model_path="https://169.254.169.254/model")

    assert problem["path"] == "pretrainedmodel_config.model_path"


@pytest.fixture
def local_minio_allowed(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("TUNERY_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("TUNERY_ALLOWED_PRIVATE_URL_HOSTS", '["127.0.0.1", "LocalHost"]')
    get_settings.cache_clear()
    return client


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000/tunery/train.jsonl", "http://localhost:9000/train.jsonl"]
)
def test_operator_allowed_private_hosts_are_accepted(
    local_minio_allowed: TestClient, url: str
) -> None:
    response = local_minio_allowed.post("/v1/finetune/llm", json=make_payload(data_path=url))

    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://2130706433/train.jsonl",
            "file:///etc/passwd"]
)
def test_allowing_some_private_hosts_allows_no_others(
    local_minio_allowed: TestClient, url: str
) -> None:
    problem = _problem(local_minio_allowed, data_path=url)

    assert problem["path"] == "data_config.data_path"
