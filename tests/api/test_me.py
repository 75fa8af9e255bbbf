"""GET /v1/me: a client checks which key it holds, its tenant and the limits it runs under."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared.db import session_scope
from shared.keys import create_api_key
from shared.models import ApiKey, utcnow


def test_me_describes_the_calling_key_its_tenant_and_limits(
    client: TestClient, api_key: str
) -> None:
    with session_scope() as session:
        key = session.scalars(select(ApiKey)).one()
        key_id, tenant_id = key.id, key.tenant_id
    response = client.get("/v1/me")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "key_id": key_id,
        "key_prefix": api_key.split("_")[1],
        "key_name": "tenant-a",
        "role": "member",
        "tenant_id": tenant_id,
        "rate_limit_per_minute": 120,
        "max_active_jobs": 10,
    }


def test_me_reports_the_limits_this_server_is_configured_with(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.settings import get_settings

    monkeypatch.setenv("TUNERY_MAX_ACTIVE_JOBS_PER_TENANT", "0")
    get_settings.cache_clear()
    with session_scope() as session:
        plaintext = create_api_key(session, "ops", admin=True).plaintext
    body = app_client.get("/v1/me", headers={"Authorization": f"Bearer {plaintext}"}).json()
    assert body["role"] == "admin" and body["key_name"] == "ops"
    assert body["max_active_jobs"] == 0


def test_me_refuses_a_missing_wrong_or_revoked_key(client: TestClient) -> None:
    assert client.get("/v1/me").status_code == 200
    assert client.get("/v1/me", headers={"Authorization": ""}).status_code == 401
    wrong = client.get("/v1/me", headers={"Authorization": "Bearer tun_nope_nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    with session_scope() as session:
        session.scalars(select(ApiKey)).one().revoked_at = utcnow()
    assert client.get("/v1/me").status_code == 401
