"""MonsterAPI's deploy (`POST /v1/deploy/llm`) and the routes it shares with jobs: a
deployment id (`dep-…`) and a job id are answered each as what it is, on every route."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.models import Deployment, JobStatus
from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.api.test_finetune_routes import submit
from tests.conftest import make_payload

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def completed_job(client: TestClient) -> str:
    job_id = submit(client, make_payload(model_path=BASE))["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)
    return job_id


def client_payload(job_id: str, **fields: Any) -> dict[str, Any]:
    """What `client.deploy("llm", params)` sends with the client's README example."""
    return {"basemodel_path": BASE, "loramodel_path": job_id,
            "prompt_template": "{prompt}{completion}", "api_auth_token": "endpoint-secret-42",
            "per_gpu_vram": 24, "gpu_count": 1, **fields}


def deploy(client: TestClient, job_id: str, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/deploy/llm", json=client_payload(job_id, **fields))
    assert response.status_code == 201, response.text
    return response.json()


def test_deploy_a_completed_job_then_read_status_logs_and_terminate(client: TestClient) -> None:
    job_id = completed_job(client)
    created = deploy(client, job_id, deployment_name="support-bot", max_model_len=2048)
    deployment_id = created["deployment_id"]
    assert deployment_id.startswith("dep-") and deployment_id != job_id
    assert created["status"] == "live"
    assert created["URL"] == f"http://testserver/v1/deployments/{deployment_id}"
    assert (created["job_id"], created["basemodel_path"]) == (job_id, BASE)
    assert created["adapter"] == f"tunery-job-{job_id}"
    assert (created["deployment_name"], created["max_model_len"]) == ("support-bot", 2048)
    assert created["payload"]["per_gpu_vram"] == 24

    status = client.get(f"/v1/deploy/status/{deployment_id}")
    assert status.status_code == 200
    assert status.json() == created

    logs = client.get(f"/v1/deploy/logs/{deployment_id}", params={"n_lines": 100}).json()
    assert [line.split(":")[0] for line in logs["logs"]] == ["created", "live"]
    assert "ignored on this server: api_auth_token, gpu_count, per_gpu_vram" in logs["logs"][0]

    terminated = client.post("/v1/deploy/terminate",
                             json={"deployment_id": deployment_id, "actor": "user"})
    assert terminated.status_code == 200
    assert terminated.json()["status"] == "TERMINATED"
    assert terminated.json()["terminated_at"] is not None
    again = client.post("/v1/deploy/terminate", json={"deployment_id": deployment_id})
    assert again.status_code == 200 and again.json() == terminated.json()
    logs = client.get(f"/v1/deploy/logs/{deployment_id}").json()
    assert [line.split(":")[0] for line in logs["logs"]] == ["created", "live", "terminated"]
    after = client.get(f"/v1/deploy/logs/{deployment_id}",
                       params={"after": logs["lines"][1]["id"]}).json()
    assert after["logs"] == logs["logs"][2:]
    assert client.get(f"/v1/deploy/status/{deployment_id}").json()["status"] == "TERMINATED"


def test_the_endpoint_token_is_never_stored_nor_shown(client: TestClient) -> None:
    deployment_id = deploy(client, completed_job(client))["deployment_id"]
    shown = client.get(f"/v1/deploy/status/{deployment_id}").text
    assert "endpoint-secret-42" not in shown
    with session_scope() as session:
        row = session.get_one(Deployment, deployment_id)
        assert "api_auth_token" not in row.payload


def test_a_terminated_deployment_answers_chat_with_openai_410(client: TestClient) -> None:
    deployment_id = deploy(client, completed_job(client))["deployment_id"]
    client.post("/v1/deploy/terminate", json={"deployment_id": deployment_id})
    answer = client.post(f"/v1/deployments/{deployment_id}/chat/completions",
                         json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 410
    error = answer.json()["error"]
    assert error["code"] == "deployment_terminated"
    assert error["type"] == "invalid_request_error"
    assert deployment_id in error["message"]


def test_job_and_deployment_ids_are_each_answered_as_what_they_are(client: TestClient) -> None:
    done = completed_job(client)
    queued = submit(client)["job_id"]
    deployment_id = deploy(client, done)["deployment_id"]

    job_status = client.get(f"/v1/deploy/status/{done}").json()
    assert job_status == client.get(f"/v1/finetune/llm/{done}").json()
    assert job_status["status"] == "COMPLETED"
    dep_status = client.get(f"/v1/deploy/status/{deployment_id}").json()
    assert (dep_status["deployment_id"], dep_status["status"]) == (deployment_id, "live")

    assert client.get(f"/v1/deploy/logs/{done}").json()["job_id"] == done
    assert client.get(f"/v1/deploy/logs/{deployment_id}").json()["deployment_id"] == deployment_id

    # A job id never reaches a deployment, nor a `dep-` id a job.
    assert client.get(f"/v1/deploy/status/dep-{done}").status_code == 404
    assert client.get(f"/v1/deploy/logs/dep-{done}").status_code == 404
    missing = client.post("/v1/deploy/terminate", json={"deployment_id": f"dep-{done}"})
    assert missing.status_code == 404
    assert "no deployment with id" in missing.json()["error"]["message"]
    assert client.get(f"/v1/finetune/llm/{deployment_id}").status_code == 404

    listed = client.get("/v1/deploy/list").json()
    assert {j["job_id"] for j in listed["items"]} == {done, queued}
    assert [d["deployment_id"] for d in listed["deployments"]] == [deployment_id]
    assert listed["deployments_total"] == 1

    # Terminate: a job is cancelled as before (a completed one refused), the deployment ends.
    assert client.post("/v1/deploy/terminate", json={"deployment_id": done}).status_code == 409
    cancelled = client.post("/v1/deploy/terminate", json={"deployment_id": queued}).json()
    assert (cancelled["job_id"], cancelled["status"]) == (queued, "CANCELLED")
    assert client.get(f"/v1/deploy/status/{deployment_id}").json()["status"] == "live"
    ended = client.post("/v1/deploy/terminate", json={"deployment_id": deployment_id}).json()
    assert ended["status"] == "TERMINATED"
    assert client.get(f"/v1/deploy/status/{done}").json()["status"] == "COMPLETED"


def test_another_tenants_deployment_is_not_found_everywhere(app_client: TestClient) -> None:
    owner, other = new_key("tenant-a"), new_key("tenant-b")
    app_client.headers["Authorization"] = f"Bearer {owner}"
    job_id = completed_job(app_client)
    deployment_id = deploy(app_client, job_id)["deployment_id"]

    app_client.headers["Authorization"] = f"Bearer {other}"
    unknown = "dep-00000000-0000-4000-8000-000000000000"
    for target in (deployment_id, unknown):
        for answer in (
            app_client.get(f"/v1/deploy/status/{target}"),
            app_client.get(f"/v1/deploy/logs/{target}"),
            app_client.post("/v1/deploy/terminate", json={"deployment_id": target}),
            app_client.post(f"/v1/deployments/{target}/chat/completions",
                            json={"model": "m", "messages": [{"role": "user",
                                                              "content": "hi"}]}),
        ):
            assert answer.status_code == 404, answer.text
            assert target in answer.text
    assert app_client.get("/v1/deploy/list").json()["deployments"] == []
    stolen = app_client.post("/v1/deploy/llm", json=client_payload(job_id))
    assert stolen.status_code == 404
    assert [f["path"] for f in stolen.json()["error"]["fields"]] == ["loramodel_path"]

    app_client.headers["Authorization"] = f"Bearer {owner}"
    assert app_client.get(f"/v1/deploy/status/{deployment_id}").json()["status"] == "live"
    # An operator's key reads and terminates every tenant's deployments, as it does jobs.
    with session_scope() as session:
        operator = create_api_key(session, "operator", admin=True).plaintext
    app_client.headers["Authorization"] = f"Bearer {operator}"
    listed = app_client.get("/v1/deploy/list").json()["deployments"]
    assert [d["deployment_id"] for d in listed] == [deployment_id]
    ended = app_client.post("/v1/deploy/terminate", json={"deployment_id": deployment_id})
    assert ended.json()["status"] == "TERMINATED"


@pytest.mark.parametrize(("fields", "status", "path", "words"), [
    ({"loramodel_path": "qblocks/OpenPlatypus_LLAMA2_7b"}, 422, "loramodel_path",
     "only the adapters of this server's own fine-tuning jobs"),
    ({"loramodel_path": "https://example.com/adapter.zip"}, 422, "loramodel_path",
     "not a Tunery job id"),
    ({"loramodel_path": ""}, 422, "loramodel_path", "loramodel_path is required"),
    ({"loramodel_path": "00000000-0000-4000-8000-000000000000"}, 404, "loramodel_path",
     "no job with id"),
    ({"basemodel_path": "meta-llama/Llama-2-7b-hf"}, 422, "basemodel_path",
     "is not the base model job"),
    ({"per_gpu_vram": "lots"}, 422, "per_gpu_vram", "integer"),
    ({"gpu_count": 0}, 422, "gpu_count", "greater than or equal to 1"),
    ({"prompt_template": "{0}{completion}"}, 422, "prompt_template", "bare column name"),
    ({"deployment_name": "my bot!"}, 422, "deployment_name", "pattern"),
    ({"max_model_len": 0}, 422, "max_model_len", "greater than or equal to 1"),
    ({"gpu_typ": "A100"}, 422, "gpu_typ", "unknown field"),
])
def test_a_bad_deploy_payload_names_the_field(client: TestClient, fields: dict[str, Any],
                                              status: int, path: str, words: str) -> None:
    job_id = completed_job(client)
    answer = client.post("/v1/deploy/llm", json=client_payload(job_id, **fields))
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert [f["path"] for f in error["fields"]] == [path]
    assert words in error["fields"][0]["message"]


def test_a_job_not_completed_is_a_409_naming_loramodel_path(client: TestClient) -> None:
    queued = submit(client)["job_id"]
    answer = client.post("/v1/deploy/llm", json=client_payload(queued))
    assert answer.status_code == 409
    error = answer.json()["error"]
    assert error["fields"][0]["path"] == "loramodel_path"
    assert "QUEUED" in error["message"]


def test_basemodel_path_may_be_left_out_or_name_an_alias_of_the_jobs_base(
    client: TestClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNERY_OPENAI_MODEL_ALIASES", f'{{"smol": "{BASE}"}}')
    get_settings.cache_clear()
    job_id = completed_job(client)
    payload = client_payload(job_id)
    del payload["basemodel_path"]
    assert client.post("/v1/deploy/llm", json=payload).json()["basemodel_path"] == BASE
    assert deploy(client, job_id, basemodel_path="smol")["basemodel_path"] == BASE
    openai_style = deploy(client, job_id, loramodel_path=f"ftjob-{job_id}")
    assert openai_style["job_id"] == job_id
    fine_tuned = client.get(f"/v1/fine_tuning/jobs/ftjob-{job_id}").json()["fine_tuned_model"]
    assert deploy(client, job_id, loramodel_path=fine_tuned)["job_id"] == job_id
    unknown = client.post("/v1/deploy/llm", json=client_payload(
        job_id, loramodel_path=fine_tuned[:-8] + "00000000"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["fields"][0]["path"] == "loramodel_path"


def test_a_full_finetune_cannot_be_deployed_and_the_refusal_says_why(client: TestClient) -> None:
    payload = make_payload(model_path=BASE)
    payload["pretrainedmodel_config"]["use_lora"] = False
    job_id = submit(client, payload)["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)

    response = client.post("/v1/deploy/llm", json=client_payload(job_id))

    assert response.status_code == 422, response.text
    assert "trained the whole model (use_lora false)" in response.text
    assert "loramodel_path" in response.text
