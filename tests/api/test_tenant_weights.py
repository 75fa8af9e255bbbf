"""`/v1/tenants/{tenant_id}/weight`: an admin key reads and sets a tenant's weight; a member
key gets 403, an unknown tenant 404, a weight out of bounds a 422 naming `weight`. The
weight is then what the next claim orders tenants by."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.models import Tenant
from shared.schema import FinetuneRequest
from shared.tenant_weights import MAX_WEIGHT, MIN_WEIGHT
from tests.conftest import make_payload


@pytest.fixture
def admin(app_client: TestClient) -> dict[str, str]:
    with session_scope() as session:
        plaintext = create_api_key(session, "ops", admin=True).plaintext
    return {"Authorization": f"Bearer {plaintext}"}


@pytest.fixture
def member(app_client: TestClient) -> tuple[dict[str, str], str]:
    """A member key's headers and its tenant's id."""
    with session_scope() as session:
        created = create_api_key(session, "tenant-b")
    return {"Authorization": f"Bearer {created.plaintext}"}, created.tenant_id


def stored_weight(tenant_id: str) -> float:
    with session_scope() as session:
        return session.get_one(Tenant, tenant_id).weight


def test_an_admin_reads_the_default_weight_and_sets_another(
    app_client: TestClient, admin: dict[str, str], member: tuple[dict[str, str], str]
) -> None:
    _, tenant_id = member
    read = app_client.get(f"/v1/tenants/{tenant_id}/weight", headers=admin)
    assert read.status_code == 200, read.text
    assert read.json() == {"tenant_id": tenant_id, "name": "tenant-b", "weight": 1.0}

    put = app_client.put(f"/v1/tenants/{tenant_id}/weight", json={"weight": 2.5}, headers=admin)
    assert put.status_code == 200, put.text
    assert put.json() == {"tenant_id": tenant_id, "name": "tenant-b", "weight": 2.5}
    assert stored_weight(tenant_id) == 2.5
    assert app_client.get(f"/v1/tenants/{tenant_id}/weight",
                          headers=admin).json()["weight"] == 2.5


def test_a_member_key_gets_403_and_changes_nothing(
    app_client: TestClient, member: tuple[dict[str, str], str]
) -> None:
    headers, tenant_id = member
    for response in (
        app_client.get(f"/v1/tenants/{tenant_id}/weight", headers=headers),
        app_client.put(f"/v1/tenants/{tenant_id}/weight", json={"weight": 50}, headers=headers),
    ):
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == "forbidden"
        assert "admin API key" in error["message"]
    assert stored_weight(tenant_id) == 1.0


def test_no_key_gets_401(app_client: TestClient, member: tuple[dict[str, str], str]) -> None:
    _, tenant_id = member
    assert app_client.get(f"/v1/tenants/{tenant_id}/weight").status_code == 401


@pytest.mark.parametrize("body", [
    {"weight": 0}, {"weight": -1}, {"weight": MAX_WEIGHT + 0.5}, {"weight": "heavy"},
    # Below the smallest: near 5e-324, running / weight overflowed PostgreSQL's claim query.
    {"weight": MIN_WEIGHT / 2}, {"weight": 5e-324},
    # Not numbers, whatever pydantic's lax mode would make of them.
    {"weight": "2"}, {"weight": True},
    {"weight": None}, {}, {"weight": 2, "priority": 1},
])
def test_a_weight_out_of_bounds_is_a_422_naming_the_field(
    app_client: TestClient, admin: dict[str, str], member: tuple[dict[str, str], str],
    body: dict[str, Any]
) -> None:
    _, tenant_id = member
    response = app_client.put(f"/v1/tenants/{tenant_id}/weight", json=body, headers=admin)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    named = {field["path"] for field in error["fields"]}
    assert named == ({"priority"} if "priority" in body else {"weight"}), error
    assert stored_weight(tenant_id) == 1.0


def test_a_weight_that_is_not_a_finite_number_is_a_422(
    app_client: TestClient, admin: dict[str, str], member: tuple[dict[str, str], str]
) -> None:
    # JSON has no NaN or Infinity, but Python's json module writes and reads them.
    _, tenant_id = member
    for literal in ("NaN", "Infinity"):
        response = app_client.put(f"/v1/tenants/{tenant_id}/weight",
                                  content=f'{{"weight": {literal}}}',
                                  headers={**admin, "Content-Type": "application/json"})
        assert response.status_code == 422, (literal, response.text)
        assert [f["path"] for f in response.json()["error"]["fields"]] == ["weight"]


def test_the_largest_weight_is_accepted(
    app_client: TestClient, admin: dict[str, str], member: tuple[dict[str, str], str]
) -> None:
    _, tenant_id = member
    response = app_client.put(f"/v1/tenants/{tenant_id}/weight", json={"weight": MAX_WEIGHT},
                              headers=admin)
    assert response.status_code == 200, response.text
    assert stored_weight(tenant_id) == MAX_WEIGHT


def test_an_unknown_tenant_is_a_404(app_client: TestClient, admin: dict[str, str]) -> None:
    for response in (
        app_client.get("/v1/tenants/no-such-tenant/weight", headers=admin),
        app_client.put("/v1/tenants/no-such-tenant/weight", json={"weight": 2}, headers=admin),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["message"] == "no tenant with id no-such-tenant"


def test_the_weight_set_decides_the_next_claim(
    app_client: TestClient, admin: dict[str, str], member: tuple[dict[str, str], str]
) -> None:
    """Tenant A runs one job, B runs two, both have one queued: B goes first only once an
    admin gives it a weight above 2."""
    _, b = member
    with session_scope() as session:
        a = create_api_key(session, "tenant-a").tenant_id
    request = FinetuneRequest.model_validate(make_payload())

    def submit(tenant_id: str) -> str:
        with session_scope() as session:
            return jobs.create_job(session, tenant_id, request, 3, device_class="train").id

    def fairest() -> str | None:
        with session_scope() as session:
            return session.scalar(jobs.fairest_queued_job("train"))

    for tenant_id in (a, b, b):
        job_id = submit(tenant_id)
        with session_scope() as session:
            assert jobs.claim_job(session, job_id, "w", 60) is not None
    queued_a, queued_b = submit(a), submit(b)
    assert fairest() == queued_a  # A: 1 running / weight 1 < B: 2 / 1

    assert app_client.put(f"/v1/tenants/{b}/weight", json={"weight": 3},
                          headers=admin).status_code == 200
    assert fairest() == queued_b  # B: 2 / 3 < A: 1 / 1
    with session_scope() as session:
        claim = jobs.claim_next(session, "w", 60, device_class="train")
    assert claim is not None and claim.job_id == queued_b
