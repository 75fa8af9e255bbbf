"""Two tenants, A and B, on one server: B can neither see nor touch A's jobs and datasets, and
cannot even tell they exist, because every route answers B about A's object exactly as it
answers about an id nobody ever used. An admin key (for operators) sees both."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from cli.main import main as tunery
from shared import jobs
from shared.db import make_engine, session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobStatus
from shared.settings import get_settings
from shared.storage import storage_from_settings
from shared.storage_keys import CHECKPOINT_MARKER
from tests.api.conftest import new_key
from tests.conftest import make_payload

ROWS = "".join(
    json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)}) + "\n"
    for i in range(8)
).encode()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def admin_key(name: str = "operator") -> str:
    with session_scope() as session:
        return create_api_key(session, name, admin=True).plaintext


@dataclass(frozen=True)
class Tenant:
    key: str
    done_job: str
    """COMPLETED, with logs, metrics and one artifact."""
    queued_job: str
    dataset: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.key)


def populate(client: TestClient, name: str) -> Tenant:
    key = new_key(name)
    headers = bearer(key)
    uploaded = client.post("/v1/datasets", files={"file": ("train.jsonl", ROWS)}, headers=headers)
    assert uploaded.status_code == 201, uploaded.text
    done, queued = (client.post("/v1/finetune/llm", json=make_payload(), headers=headers)
                    for _ in range(2))
    assert done.status_code == queued.status_code == 201, done.text
    done_id, queued_id = done.json()["job_id"], queued.json()["job_id"]
    storage = storage_from_settings(get_settings())
    storage.put_bytes(f"jobs/{done_id}/adapter_config.json", b'{"r": 8}')
    # The queued job's first checkpoint, so that its owner may resume from it.
    storage.put_bytes(f"checkpoints/{queued_id}/step-1/adapter_config.json", b'{"r": 8}')
    storage.put_bytes(f"checkpoints/{queued_id}/step-1/{CHECKPOINT_MARKER}",
                      b'{"step": 1, "files": {"adapter_config.json": 8}}')
    with session_scope() as session:
        claim = jobs.claim_job(session, done_id, "test-worker", 60)
        assert claim is not None
        jobs.append_log(session, done_id, claim.attempt, f"{name} step 1 | loss 1.0")
        jobs.record_metric(session, done_id, claim.attempt, 1, {"loss": 1.0})
        assert jobs.transition(session, done_id, JobStatus.COMPLETED, attempt=claim.attempt)
    return Tenant(key, done_id, queued_id, uploaded.json()["id"])


@pytest.fixture
def a(app_client: TestClient) -> Tenant:
    return populate(app_client, "tenant-a")


@pytest.fixture
def b(app_client: TestClient) -> Tenant:
    return populate(app_client, "tenant-b")


def random_job_id() -> str:
    return str(uuid.uuid4())


def random_dataset_id() -> str:
    return f"ds_{uuid.uuid4().hex}"


Request = Callable[[TestClient, dict[str, str], str], httpx.Response]
"""(client, headers, target id) -> response."""


def _submit(**sections: dict[str, Any]) -> Request:
    def send(client: TestClient, headers: dict[str, str], target: str) -> httpx.Response:
        filled = {section: {k: v.format(id=target) for k, v in values.items()}
                  for section, values in sections.items()}
        data_path = filled.pop("data", {}).get("data_path")
        return client.post("/v1/finetune/llm", json=make_payload(data_path=data_path, **filled),
                           headers=headers)
    return send


def _get(template: str) -> Request:
    return lambda client, headers, target: client.get(template.format(id=target),
                                                       headers=headers)


def _post(template: str, body: dict[str, Any] | None = None) -> Request:
    def send(client: TestClient, headers: dict[str, str], target: str) -> httpx.Response:
        json_body = json.loads(json.dumps(body).replace("{id}", target)) if body else None
        return client.post(template.format(id=target), json=json_body, headers=headers)
    return send


# (name, which of A's objects it names, the request, B's expected status)
ROUTES: list[tuple[str, str, Request, int]] = [
    ("job status", "done_job", _get("/v1/finetune/llm/{id}"), 404),
    ("job logs", "done_job", _get("/v1/finetune/llm/{id}/logs?n_lines=10"), 404),
    ("job metrics", "done_job", _get("/v1/finetune/llm/{id}/metrics"), 404),
    ("job stream", "done_job", _get("/v1/finetune/llm/{id}/stream"), 404),
    ("artifact list", "done_job", _get("/v1/finetune/llm/{id}/artifacts"), 404),
    ("artifact download", "done_job",
     _get("/v1/finetune/llm/{id}/artifacts/adapter_config.json"), 404),
    ("artifact archive", "done_job", _get("/v1/finetune/llm/{id}/artifacts/archive"), 404),
    ("cancel", "queued_job", _post("/v1/finetune/llm/{id}/cancel"), 404),
    ("deploy status", "done_job", _get("/v1/deploy/status/{id}"), 404),
    ("deploy logs", "done_job", _get("/v1/deploy/logs/{id}"), 404),
    ("deploy terminate", "queued_job",
     _post("/v1/deploy/terminate", {"deployment_id": "{id}"}), 404),
    ("dataset get", "dataset", _get("/v1/datasets/{id}"), 404),
    ("dataset preview", "dataset",
     _post("/v1/datasets/{id}/preview", {"prompt_template": "{instruction} {output}"}), 404),
    ("resume from a job id", "done_job",
     _submit(pretrainedmodel_config={"resume_checkpoint_path": "{id}"}), 422),
    ("resume from a final adapter", "done_job",
     _submit(pretrainedmodel_config={"resume_checkpoint_path": "jobs/{id}"}), 422),
    ("resume from a checkpoint", "queued_job",
     _submit(pretrainedmodel_config={"resume_checkpoint_path": "jobs/{id}/checkpoints/step-1"}),
     422),
    ("train on an uploaded dataset", "dataset", _submit(data={"data_path": "{id}"}), 422),
]


def masked(response: httpx.Response, target: str) -> tuple[int, str, str]:
    return (response.status_code, response.headers.get("content-type", ""),
            response.text.replace(target, "<id>"))


@pytest.mark.parametrize(("name", "field", "request_", "status"), ROUTES,
                         ids=[route[0] for route in ROUTES])
def test_another_tenants_object_answers_exactly_like_a_random_id(
    app_client: TestClient, a: Tenant, b: Tenant, name: str, field: str, request_: Request,
    status: int,
) -> None:
    target = getattr(a, field)
    random_id = random_dataset_id() if field == "dataset" else random_job_id()

    as_b = request_(app_client, b.headers, target)
    as_b_random = request_(app_client, b.headers, random_id)

    assert as_b.status_code == status, as_b.text
    assert masked(as_b, target) == masked(as_b_random, random_id)
    assert as_b.json()["error"]["code"] in ("not_found", "invalid_request")
    # The route does work for the owner, so the 404 above is isolation, not a broken route.
    assert request_(app_client, a.headers, target).status_code in (200, 201), name


def test_another_tenants_cancel_leaves_the_job_running(
    app_client: TestClient, a: Tenant, b: Tenant
) -> None:
    app_client.post(f"/v1/finetune/llm/{a.queued_job}/cancel", headers=b.headers)
    app_client.post("/v1/deploy/terminate", json={"deployment_id": a.queued_job},
                    headers=b.headers)

    with session_scope() as session:
        job = session.get_one(Job, a.queued_job)
        assert (job.status, job.cancel_requested) == ("QUEUED", False)


def test_listings_show_only_the_callers_own_jobs_and_datasets(
    app_client: TestClient, a: Tenant, b: Tenant
) -> None:
    for path, own in [("/v1/finetune/llm", {b.done_job, b.queued_job}),
                      ("/v1/deploy/list", {b.done_job, b.queued_job}),
                      ("/v1/datasets", {b.dataset})]:
        listing = app_client.get(path, headers=b.headers).json()
        ids = {item.get("job_id") or item.get("id") for item in listing["items"]}
        assert ids == own, path
        assert listing["total"] == len(own), path
        assert {item["tenant_id"] for item in listing["items"]} == {_tenant_of(b)}


def _tenant_of(tenant: Tenant) -> str:
    with session_scope() as session:
        return session.get_one(Job, tenant.done_job).tenant_id


def test_an_admin_key_lists_every_tenants_jobs_and_datasets_with_their_tenant(
    app_client: TestClient, a: Tenant, b: Tenant
) -> None:
    admin = bearer(admin_key())

    for path in ("/v1/finetune/llm", "/v1/deploy/list"):
        items = app_client.get(path, headers=admin).json()["items"]
        assert {(i["job_id"], i["tenant_id"]) for i in items} == {
            (a.done_job, _tenant_of(a)), (a.queued_job, _tenant_of(a)),
            (b.done_job, _tenant_of(b)), (b.queued_job, _tenant_of(b)),
        }, path
    datasets = app_client.get("/v1/datasets", headers=admin).json()
    assert datasets["total"] == 2
    assert {d["id"] for d in datasets["items"]} == {a.dataset, b.dataset}


def test_an_admin_key_reads_and_cancels_any_tenants_job_and_dataset(
    app_client: TestClient, a: Tenant, b: Tenant
) -> None:
    admin = bearer(admin_key())

    for tenant in (a, b):
        for route, field, request_, _ in ROUTES:
            if route.startswith(("resume", "train")):
                continue  # submissions: see the next test
            response = request_(app_client, admin, getattr(tenant, field))
            # "cancel" already cancelled the queued job: terminate finds it, in a final state.
            expected = 409 if route == "deploy terminate" else 200
            assert response.status_code == expected, (route, response.text)
    assert app_client.get(f"/v1/finetune/llm/{a.done_job}/logs", headers=admin).json()[
        "logs"] == ["tenant-a step 1 | loss 1.0"]
    with session_scope() as session:
        assert {session.get_one(Job, t.queued_job).status for t in (a, b)} == {"CANCELLED"}


def test_an_admin_keys_own_submissions_name_only_its_own_tenants_objects(
    app_client: TestClient, a: Tenant
) -> None:
    # Reading across tenants is for operators; a job is always its submitter's, and it
    # trains only on the submitter's data.
    admin = bearer(admin_key())

    on_a_data = app_client.post("/v1/finetune/llm", json=make_payload(data_path=a.dataset),
                                headers=admin)
    own = app_client.post("/v1/finetune/llm", json=make_payload(), headers=admin)

    assert on_a_data.status_code == 422
    assert own.status_code == 201
    assert app_client.get(f"/v1/finetune/llm/{own.json()['job_id']}",
                          headers=a.headers).status_code == 404


def test_a_member_key_is_not_an_admin(app_client: TestClient, a: Tenant) -> None:
    member = bearer(new_key("tenant-c"))

    assert app_client.get(f"/v1/finetune/llm/{a.done_job}", headers=member).status_code == 404
    assert app_client.get("/v1/finetune/llm", headers=member).json()["total"] == 0


def test_cli_creates_an_admin_key(
    app_client: TestClient, a: Tenant, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tunery(["keys", "create", "--name", "ops", "--admin", "--quiet"]) == 0
    key = capsys.readouterr().out.strip()

    response = app_client.get(f"/v1/finetune/llm/{a.done_job}", headers=bearer(key))

    assert response.status_code == 200
    assert tunery(["keys", "create", "--name", "plain", "--quiet"]) == 0
    plain = capsys.readouterr().out.strip()
    assert app_client.get(f"/v1/finetune/llm/{a.done_job}",
                          headers=bearer(plain)).status_code == 404


def test_keys_created_before_roles_existed_become_members(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade_database(url, "0004")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO tenants (id, name, created_at) "
                                 "VALUES ('t1', 'old', CURRENT_TIMESTAMP)"))
            conn.execute(sa.text(
                "INSERT INTO api_keys (id, tenant_id, name, prefix, secret_hash, created_at) "
                "VALUES ('k1', 't1', 'old', 'abc', 'x', CURRENT_TIMESTAMP)"))
        upgrade_database(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT role FROM api_keys")).scalar_one() == "member"
    finally:
        engine.dispose()
