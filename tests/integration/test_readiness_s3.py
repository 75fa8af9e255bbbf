"""`/readyz` names why S3 storage is unusable, against a real S3-compatible HTTP endpoint (moto's
server) and a closed port: unreachable, bucket missing, access denied, each with what to check
and never a credential."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import moto.settings
import pytest
from fastapi.testclient import TestClient

from shared.settings import get_settings
from shared.storage import S3Storage
from tests.chaos.processes import free_port


def readiness(monkeypatch: pytest.MonkeyPatch, storage_url: str, endpoint_url: str,
              credentials: dict[str, str]) -> tuple[int, dict[str, Any]]:
    monkeypatch.setenv("TUNERY_STORAGE_URL", storage_url)
    monkeypatch.setenv("TUNERY_S3_ENDPOINT_URL", endpoint_url)
    monkeypatch.setenv("TUNERY_S3_ACCESS_KEY_ID", credentials["access_key_id"])
    monkeypatch.setenv("TUNERY_S3_SECRET_ACCESS_KEY", credentials["secret_access_key"])
    get_settings.cache_clear()
    from api.main import create_app

    with TestClient(create_app()) as client:
        response = client.get("/readyz")
    assert credentials["secret_access_key"] not in response.text
    return response.status_code, response.json()


def test_a_usable_bucket_is_ready(tunery_env: Path, s3_storage: S3Storage, s3_endpoint_url: str,
                                  s3_credentials: dict[str, str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    status, body = readiness(monkeypatch, f"s3://{s3_storage.bucket}/store-root",
                             s3_endpoint_url, s3_credentials)
    assert (status, body["checks"]["storage"]) == (200, "ok")


def test_a_closed_port_is_unreachable_and_names_the_endpoint(
    tunery_env: Path, s3_credentials: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    status, body = readiness(monkeypatch, "s3://tunery/store-root", endpoint, s3_credentials)
    storage = body["checks"]["storage"]
    assert status == 503 and body["status"] == "not_ready"
    assert storage.startswith("unreachable: "), storage
    assert endpoint in storage
    assert body["checks"]["database"] == "ok"


def test_a_missing_bucket_says_so_and_how_to_create_it(
    tunery_env: Path, s3_endpoint_url: str, s3_credentials: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status, body = readiness(monkeypatch, "s3://tunery-no-such-bucket/store-root",
                             s3_endpoint_url, s3_credentials)
    storage = body["checks"]["storage"]
    assert status == 503
    assert storage.startswith("bucket_missing: "), storage
    assert "'tunery-no-such-bucket' does not exist" in storage


def test_unknown_credentials_are_access_denied_naming_the_settings_not_the_secret(
    tunery_env: Path, s3_storage: S3Storage, s3_endpoint_url: str,
    s3_credentials: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # moto accepts any credentials until told to authenticate: from now on it checks them
    # against its IAM users, where this key does not exist (as S3 would answer a revoked key).
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    status, body = readiness(monkeypatch, f"s3://{s3_storage.bucket}/store-root",
                             s3_endpoint_url, s3_credentials)
    storage = body["checks"]["storage"]
    assert status == 503
    assert storage.startswith("access_denied: "), storage
    assert "TUNERY_S3_ACCESS_KEY_ID" in storage and "TUNERY_S3_SECRET_ACCESS_KEY" in storage
