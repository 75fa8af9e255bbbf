"""The /v1/finetune/llm routes against a real app, SQLite database and SQLite broker."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared import jobs
from shared.db import session_scope
from shared.models import ApiKey, Job, JobEvent, JobStatus
from shared.schema import TrainingConfig
from tests.api.conftest import new_key
from tests.conftest import make_payload


def submit(client: TestClient, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post("/v1/finetune/llm", json=payload or make_payload())
    assert response.status_code == 201, response.text
    return response.json()


def test_submit_stores_a_queued_job_and_returns_its_id_under_both_names(client: TestClient) -> None:
    body = submit(client)
    assert body["status"] == "QUEUED"
    assert body["deployment_id"] == body["job_id"]
    with session_scope() as session:
        job = session.get_one(Job, body["job_id"])
        assert job.status == "QUEUED"
        assert job.payload["pretrainedmodel_config"]["lora_r"] == 8
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
        assert [e.to_status for e in events] == ["QUEUED"]


def test_submit_sends_a_wake_up_message_after_commit(client: TestClient) -> None:
    from shared.queue import get_celery

    body = submit(client)
    with get_celery().connection_for_read() as conn:
        queue = conn.SimpleQueue("train", no_ack=True)
        message = queue.get(timeout=5)
        assert message.headers["task"] == "tunery.train"
        assert message.headers["argsrepr"] == repr([body["job_id"]])
        queue.close()


def test_every_v1_route_needs_a_valid_key(app_client: TestClient) -> None:
    for method, path in [
        ("POST", "/v1/finetune/llm"),
        ("GET", "/v1/finetune/llm"),
        ("GET", "/v1/finetune/llm/x"),
        ("GET", "/v1/deploy/list"),
        ("GET", "/v1/me"),
        ("POST", "/v1/deploy/terminate"),
    ]:
        response = app_client.request(method, path, json={})
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
        response = app_client.request(
            method, path, json={}, headers={"Authorization": "Bearer tun_nope_nope"}
        )
        assert response.status_code == 401, path


def test_revoked_key_is_refused(client: TestClient, api_key: str) -> None:
    assert client.get("/v1/finetune/llm").status_code == 200
    with session_scope() as session:
        session.scalars(select(ApiKey)).one().revoked_at = jobs.utcnow()
    assert client.get("/v1/finetune/llm").status_code == 401


def test_key_is_stored_only_as_a_hash(client: TestClient, api_key: str) -> None:
    secret = api_key.split("_")[2]
    with session_scope() as session:
        key = session.scalars(select(ApiKey)).one()
        assert secret not in (key.secret_hash, key.prefix)
        assert key.last_used_at is None or key.last_used_at is not None


def test_unknown_field_is_a_422_naming_the_field(client: TestClient) -> None:
    payload = make_payload(training_config={"num_train_epoch": 2})
    response = client.post("/v1/finetune/llm", json=payload)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["fields"][0]["path"] == "training_config.num_train_epoch"
    assert "unknown field" in error["fields"][0]["message"]
    with session_scope() as session:
        assert session.scalars(select(Job)).all() == []


def test_bad_value_is_a_422_with_the_constraint(client: TestClient) -> None:
    response = client.post(
        "/v1/finetune/llm", json=make_payload(pretrainedmodel_config={"lora_r": 0})
    )
    assert response.status_code == 422
    field = response.json()["error"]["fields"][0]
    assert field["path"] == "pretrainedmodel_config.lora_r"
    assert "greater than 0" in field["message"]


def test_neftune_with_dpo_is_a_422_naming_both_fields(client: TestClient) -> None:
    payload = make_payload(training_config={"preference_optimization": "DPO",
                                            "neftune_noise_alpha": 5})
    response = client.post("/v1/finetune/llm", json=payload)
    assert response.status_code == 422
    field = response.json()["error"]["fields"][0]
    assert field["path"] == "training_config.neftune_noise_alpha"
    assert "preference_optimization 'DPO'" in field["message"]


def test_unsafe_prompt_template_is_a_422_naming_the_template(client: TestClient) -> None:
    # str.format would read an attribute of the row value here.
    payload = make_payload(data_config={"prompt_template": "{instruction.__class__} {output}"})

    response = client.post("/v1/finetune/llm", json=payload)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert [f["path"] for f in error["fields"]] == ["data_config.prompt_template"]
    assert "not a bare column name" in error["fields"][0]["message"]
    with session_scope() as session:
        assert session.scalars(select(Job)).all() == []


def test_prevalidated_true_is_accepted_like_false(client: TestClient) -> None:
    body = submit(client, make_payload(data_config={"prevalidated": True}))

    assert body["status"] == "QUEUED"
    with session_scope() as session:
        stored = session.get_one(Job, body["job_id"]).payload
        assert stored["data_config"]["prevalidated"] is True


def test_local_path_outside_allowed_dirs_is_a_422(client: TestClient) -> None:
    response = client.post("/v1/finetune/llm", json=make_payload(data_path="/etc/passwd"))
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["path"] == "data_config.data_path"


def test_refused_local_path_names_no_server_directory(client: TestClient) -> None:
    from shared.settings import get_settings

    response = client.post("/v1/finetune/llm", json=make_payload(data_path="/etc/passwd"))

    message = response.json()["error"]["fields"][0]["message"]
    assert "TUNERY_ALLOWED_LOCAL_DIRS" in message
    assert not any(str(d) in message for d in get_settings().sources.allowed_local_dirs)


@pytest.mark.parametrize("data_path", ["text", "json", "csv", "parquet", "imagefolder", "alpaca"])
def test_a_bare_dataset_name_is_a_422_saying_how_to_name_data(
    client: TestClient, data_path: str
) -> None:
    # datasets.load_dataset("text") is a packaged builder that reads files under the worker's
    # current directory, not a hub dataset.
    response = client.post("/v1/finetune/llm", json=make_payload(data_path=data_path))

    assert response.status_code == 422
    (field,) = response.json()["error"]["fields"]
    assert field["path"] == "data_config.data_path"
    assert "hub datasets are named 'owner/name'" in field["message"]
    assert "TUNERY_ALLOWED_LOCAL_DIRS" in field["message"]
    assert "POST /v1/datasets" in field["message"]
    with session_scope() as session:
        assert session.scalars(select(Job)).all() == []


def test_owner_name_hub_datasets_and_bare_hub_models_are_accepted(client: TestClient) -> None:
    body = submit(client, make_payload(model_path="gpt2", data_path="tatsu-lab/alpaca"))

    assert body["status"] == "QUEUED"


def test_malformed_json_is_a_422_not_a_500(client: TestClient) -> None:
    response = client.post(
        "/v1/finetune/llm", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_get_job_reports_status_phase_and_masks_secrets(client: TestClient) -> None:
    payload = make_payload()
    payload["hf_config"] = {"hf_token": "hf_very_secret"}
    job_id = submit(client, payload)["job_id"]
    response = client.get(f"/v1/finetune/llm/{job_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "QUEUED"
    assert body["monsterapi_status"] == "IN_QUEUE"
    assert body["phase"] is None
    assert "hf_very_secret" not in response.text
    assert body["artifacts_url"] == f"/v1/finetune/llm/{job_id}/artifacts"


def test_unknown_job_is_a_404(client: TestClient) -> None:
    response = client.get("/v1/finetune/llm/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_another_tenants_job_looks_missing(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    for path in ["", "/logs", "/metrics", "/artifacts"]:
        response = client.get(f"/v1/finetune/llm/{job_id}{path}", headers=other)
        assert response.status_code == 404, path
    assert client.post(f"/v1/finetune/llm/{job_id}/cancel", headers=other).status_code == 404
    assert client.get("/v1/finetune/llm", headers=other).json()["total"] == 0


def test_list_is_paginated_newest_first(client: TestClient) -> None:
    ids = [submit(client)["job_id"] for _ in range(3)]
    page = client.get("/v1/finetune/llm", params={"limit": 2}).json()
    assert page["total"] == 3
    assert [j["job_id"] for j in page["items"]] == ids[::-1][:2]
    rest = client.get("/v1/finetune/llm", params={"limit": 2, "offset": 2}).json()
    assert [j["job_id"] for j in rest["items"]] == ids[:1]
    assert client.get("/v1/finetune/llm", params={"limit": 0}).status_code == 422


def test_cancel_queued_job_is_immediate_and_cancel_again_is_409(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    response = client.post(f"/v1/finetune/llm/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "CANCELLED"
    again = client.post(f"/v1/finetune/llm/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"


def test_cancel_running_job_sets_the_flag_for_the_worker(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "test-worker", 60) is not None
    body = client.post(f"/v1/finetune/llm/{job_id}/cancel").json()
    assert body["status"] == "RUNNING"
    assert body["cancel_requested"] is True


def test_logs_and_metrics_come_back_in_order(client: TestClient) -> None:
    job_id = submit(client)["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "test-worker", 60)
        assert claim is not None
        for i in range(5):
            jobs.append_log(session, job_id, claim.attempt, f"line {i}")
            jobs.record_metric(session, job_id, claim.attempt, i + 1, {"loss": 3.0 - i})
    logs = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 2}).json()
    assert logs["logs"] == ["line 3", "line 4"]
    metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["values"]["loss"] == -1.0
    assert client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 0}).status_code == 422


def test_artifacts_of_completed_job_download_through_the_api(client: TestClient) -> None:
    from shared.settings import get_settings
    from shared.storage import storage_from_settings

    job_id = submit(client)["job_id"]
    storage = storage_from_settings(get_settings())
    storage.put_bytes(f"jobs/{job_id}/adapter_config.json", b'{"r": 8}')
    assert client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()["artifacts"] == []
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)
    listing = client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()["artifacts"]
    assert listing == [
        {
            "name": "adapter_config.json",
            "size": 8,
            "download_url": f"/v1/finetune/llm/{job_id}/artifacts/adapter_config.json",
        }
    ]
    download = client.get(listing[0]["download_url"])
    assert download.status_code == 200
    assert download.content == b'{"r": 8}'
    for name in ["../../etc/passwd", "..%2F..%2Fetc", "missing.bin"]:
        assert client.get(f"/v1/finetune/llm/{job_id}/artifacts/{name}").status_code == 404


def test_artifacts_never_include_checkpoints_of_either_layout(client: TestClient) -> None:
    # A completed job's checkpoints are deleted; if that failed they must still not show.
    # Before checkpoints got their own prefix they were written inside the job's artifacts.
    from shared.settings import get_settings
    from shared.storage import storage_from_settings

    job_id = submit(client)["job_id"]
    storage = storage_from_settings(get_settings())
    storage.put_bytes(f"jobs/{job_id}/adapter_model.safetensors", b"final")
    storage.put_bytes(f"jobs/{job_id}/checkpoints/step-4/optimizer.pt", b"legacy")
    storage.put_bytes(f"checkpoints/{job_id}/step-6/optimizer.pt", b"current")
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)

    listing = client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()["artifacts"]

    assert [a["name"] for a in listing] == ["adapter_model.safetensors"]
    legacy = f"/v1/finetune/llm/{job_id}/artifacts/checkpoints/step-4/optimizer.pt"
    assert client.get(legacy).status_code == 404


def test_health_and_readiness(app_client: TestClient) -> None:
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


@pytest.mark.parametrize("value", [-1, 9, "three"])
def test_bad_sample_prompts_is_a_422_naming_the_field(client: TestClient, value: Any) -> None:
    response = client.post(
        "/v1/finetune/llm", json=make_payload(training_config={"sample_prompts": value})
    )
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["path"] == "training_config.sample_prompts"


def test_sample_prompts_defaults_to_none_and_3_is_accepted(client: TestClient) -> None:
    body = submit(client, make_payload(training_config={"sample_prompts": 3}))
    with session_scope() as session:
        job = session.get_one(Job, body["job_id"])
        assert job.payload["training_config"]["sample_prompts"] == 3
    assert TrainingConfig().sample_prompts == 0
