"""`POST/GET /v1/finetune/llm/{job_id}/exports`: exports of a completed job of the caller's
tenant, one per format and quantization, claimed once by a worker, never changing the job.
Real app, real SQLite database, real local storage; no worker (tests/e2e runs one)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared import exports
from shared.db import session_scope
from shared.models import Job, JobExport
from shared.settings import get_settings
from shared.storage import storage_from_settings
from tests.api.conftest import new_key
from tests.api.test_artifact_archive import FILES, completed_job, unpacked
from tests.api.test_finetune_routes import submit
from tests.conftest import make_payload


def export(client: TestClient, job_id: str, body: dict[str, Any]) -> Any:
    return client.post(f"/v1/finetune/llm/{job_id}/exports", json=body)


def test_a_completed_job_is_queued_for_export_and_asking_again_returns_the_same_export(
    client: TestClient
) -> None:
    job_id = completed_job(client)

    first = export(client, job_id, {"format": "gguf"})
    again = export(client, job_id, {"format": "gguf", "quantization": "f16"})
    other = export(client, job_id, {"format": "gguf", "quantization": "q8_0"})
    merged = export(client, job_id, {"format": "merged"})

    assert first.status_code == 202, first.text
    assert first.json()["status"] == "QUEUED" and first.json()["quantization"] == "f16"
    assert again.status_code == 200 and again.json()["export_id"] == first.json()["export_id"]
    assert other.status_code == 202 and other.json()["export_id"] != first.json()["export_id"]
    assert merged.status_code == 202 and merged.json()["quantization"] is None
    listed = client.get(f"/v1/finetune/llm/{job_id}/exports").json()["exports"]
    assert [(e["format"], e["quantization"], e["status"]) for e in listed] == [
        ("gguf", "f16", "QUEUED"), ("gguf", "q8_0", "QUEUED"), ("merged", None, "QUEUED")]


@pytest.mark.parametrize(("body", "path", "says"), [
    ({"format": "merged", "quantization": "q8_0"}, "quantization", "format 'gguf' only"),
    ({"format": "gguf", "quantization": "q4_k"}, "quantization", "'f16' or 'q8_0'"),
    ({"format": "onnx"}, "format", "'merged' or 'gguf'"),
    ({}, "format", "required"),
    ({"format": "gguf", "quantisation": "f16"}, "quantisation", "unknown field"),
])
def test_a_bad_export_request_is_a_422_naming_the_field(
    client: TestClient, body: dict[str, Any], path: str, says: str
) -> None:
    job_id = completed_job(client)

    response = export(client, job_id, body)

    assert response.status_code == 422, response.text
    fields = response.json()["error"]["fields"]
    assert [f["path"] for f in fields] == [path]
    assert says in fields[0]["message"]


def test_a_job_not_completed_is_a_409_naming_its_status(client: TestClient) -> None:
    job_id = submit(client)["job_id"]

    response = export(client, job_id, {"format": "merged"})

    assert response.status_code == 409
    assert "is QUEUED" in response.json()["error"]["message"]
    assert client.get(f"/v1/finetune/llm/{job_id}/exports").json()["exports"] == []


def test_another_tenants_job_is_a_404_to_export_and_to_list(
    client: TestClient, app_client: TestClient
) -> None:
    job_id = completed_job(client)
    export(client, job_id, {"format": "merged"})
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}

    posted = app_client.post(f"/v1/finetune/llm/{job_id}/exports", json={"format": "merged"},
                             headers=other)
    listed = app_client.get(f"/v1/finetune/llm/{job_id}/exports", headers=other)

    assert posted.status_code == listed.status_code == 404
    assert export(client, "no-such-job", {"format": "merged"}).status_code == 404


def test_a_message_delivered_twice_claims_the_export_once_and_a_stale_finish_is_refused(
    client: TestClient
) -> None:
    job_id = completed_job(client)
    export_id = export(client, job_id, {"format": "merged"}).json()["export_id"]

    with session_scope() as session:
        first = exports.claim_export(session, export_id, "worker-1", 3600)
    with session_scope() as session:
        second = exports.claim_export(session, export_id, "worker-2", 3600)

    assert first is not None and first.attempt == 1 and second is None
    stale = exports.ExportClaim(export_id, job_id, first.tenant_id, "merged", 0, "old")
    with session_scope() as session:
        assert not exports.finish_export(session, stale, files=["x"])
    with session_scope() as session:
        assert exports.finish_export(session, first, files=["exports/merged/config.json"])
    listed = client.get(f"/v1/finetune/llm/{job_id}/exports").json()["exports"]
    assert listed[0]["status"] == "COMPLETED"
    assert listed[0]["artifacts"] == ["exports/merged/config.json"]
    # Completed: asking again returns it, nothing is queued.
    assert export(client, job_id, {"format": "merged"}).status_code == 200


def test_a_failed_export_leaves_the_job_alone_and_asking_again_queues_it_anew(
    client: TestClient
) -> None:
    job_id = completed_job(client)
    with session_scope() as session:
        before = session.get_one(Job, job_id)
        job_before = (before.status, before.updated_at, before.error, before.result)
    export_id = export(client, job_id, {"format": "gguf"}).json()["export_id"]
    with session_scope() as session:
        claim = exports.claim_export(session, export_id, "worker-1", 3600)
        assert claim is not None
        assert exports.finish_export(session, claim, error="GGUF conversion failed: because")

    failed = client.get(f"/v1/finetune/llm/{job_id}/exports").json()["exports"][0]
    retried = export(client, job_id, {"format": "gguf"})

    assert failed["status"] == "FAILED" and failed["error"] == "GGUF conversion failed: because"
    assert retried.status_code == 202
    assert retried.json()["export_id"] == export_id and retried.json()["status"] == "QUEUED"
    assert retried.json()["error"] is None
    with session_scope() as session:
        after = session.get_one(Job, job_id)
        assert (after.status, after.updated_at, after.error, after.result) == job_before
        assert session.get_one(JobExport, export_id).attempt == 1


def test_export_files_are_artifacts_to_download_but_stay_out_of_the_adapters_archive(
    client: TestClient
) -> None:
    job_id = completed_job(client)
    storage = storage_from_settings(get_settings())
    storage.put_bytes(f"jobs/{job_id}/exports/gguf-f16/model-f16.gguf", b"GGUF" + bytes(600))
    storage.put_bytes(f"jobs/{job_id}/exports/gguf-f16/Modelfile", b"FROM ./model-f16.gguf\n")

    listing = client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()
    names = {a["name"]: a["download_url"] for a in listing["artifacts"]}
    gguf = client.get(names["exports/gguf-f16/model-f16.gguf"])
    archive = unpacked(client.get(listing["archive_url"]).content)

    assert gguf.status_code == 200 and gguf.content == b"GGUF" + bytes(600)
    assert gguf.headers["content-disposition"] == 'attachment; filename="model-f16.gguf"'
    assert sorted(archive) == sorted(f"{job_id}-adapter/{name}" for name in FILES)


@pytest.mark.parametrize(("exports_asked", "path", "says"), [
    ([{"format": "merged", "quantization": "f16"}],
     "training_config.exports_on_completion.0.quantization", "format 'gguf' only"),
    ([{"format": "gguf"}, {"format": "gguf", "quantization": "f16"}],
     "training_config.exports_on_completion", "repeated: ['gguf-f16']"),
    ([{"format": "merged"}] * 4, "training_config.exports_on_completion", "at most 3"),
])
def test_exports_asked_for_at_submit_are_checked_like_the_route_naming_the_field(
    client: TestClient, exports_asked: list[dict[str, Any]], path: str, says: str
) -> None:
    payload = make_payload(training_config={"exports_on_completion": exports_asked})

    response = client.post("/v1/finetune/llm", json=payload)

    assert response.status_code == 422, response.text
    fields = response.json()["error"]["fields"]
    assert [f["path"] for f in fields] == [path]
    assert says in fields[0]["message"]


def test_a_job_that_asks_for_exports_at_submit_has_none_until_it_completes(
    client: TestClient
) -> None:
    asked = [{"format": "merged"}, {"format": "gguf", "quantization": "q8_0"}]
    job_id = submit(client, make_payload(training_config={"exports_on_completion": asked}))[
        "job_id"]

    stored = client.get(f"/v1/finetune/llm/{job_id}").json()["payload"]
    assert stored["training_config"]["exports_on_completion"] == [
        {"format": "merged", "quantization": None}, {"format": "gguf", "quantization": "q8_0"}]
    assert client.get(f"/v1/finetune/llm/{job_id}/exports").json()["exports"] == []
