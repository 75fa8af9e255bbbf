"""Device classes at submit: every face routes a job to the smallest class that fits it and
stores it, a job no class fits is one 422 naming the field to change, and the job's wake-ups
go to its class's queue. A real app on the embedded stack (SQLite, the SQLite broker)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.db import session_scope
from shared.models import Job
from shared.queue import count_waiting_messages
from tests.api.conftest import new_key
from tests.api.test_openai_dialect import chat_lines, create, upload
from tests.conftest import make_payload

CLASSES = [{"name": "small", "devices": 1, "memory_gb": 8},
           {"name": "big", "devices": 1, "memory_gb": 40},
           {"name": "pair", "devices": 2, "memory_gb": 80}]
URL = "/v1/finetune/llm"


@pytest.fixture
def client(tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("TUNERY_DEVICE_CLASSES", json.dumps(CLASSES))
    from api.main import create_app

    with TestClient(create_app()) as app_client:
        app_client.headers["Authorization"] = f"Bearer {new_key('tenant-a')}"
        yield app_client


def payload(model_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct", **training: Any
            ) -> dict[str, Any]:
    body = make_payload(model_path=model_path)
    body["training_config"].update(training)
    return body


def refused(client: TestClient, body: dict[str, Any]) -> tuple[str, dict[str, str]]:
    response = client.post(URL, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    return error["message"], {f["path"]: f["message"] for f in error["fields"]}


def test_a_job_is_stored_with_its_class_and_woken_on_that_class_s_queue(
        client: TestClient) -> None:
    small = client.post(URL, json=payload()).json()["job_id"]
    pair = client.post(URL, json=payload(devices=2)).json()["job_id"]
    big = client.post(URL, json=payload("Qwen/Qwen2.5-7B-Instruct")).json()["job_id"]

    with session_scope() as session:
        assert [session.get_one(Job, job_id).device_class for job_id in (small, pair, big)] == [
            "small", "pair", "big"]
    assert client.get(f"{URL}/{pair}").json()["device_class"] == "pair"
    assert [count_waiting_messages(name) for name in ("small", "big", "pair")] == [1, 1, 1]
    assert count_waiting_messages("train") == 0


def test_more_devices_than_any_class_has_is_a_422_naming_training_config_devices(
        client: TestClient) -> None:
    message, fields = refused(client, payload(devices=4))

    assert fields == {"training_config.devices": "no device class has 4 devices; classes: "
                                                 "small (1), big (1), pair (2)"}
    assert message == f"training_config.devices: {fields['training_config.devices']}"


def test_a_model_no_class_holds_is_a_422_naming_model_path_with_the_ways_out(
        client: TestClient) -> None:
    _, fields = refused(client, payload("meta-llama/Meta-Llama-3-70B"))

    (path,) = fields
    assert path == "pretrainedmodel_config.model_path"
    assert fields[path].startswith("about 165.0 GB per device needed (70B parameters from "
                                   "its name, 16-bit, on 1 device); the largest class with 1 "
                                   "or more devices has 80 GB (pair)")
    assert "use_quantization true (about 46.8 GB per device)" in fields[path]
    assert "'fsdp' with training_config.devices 2 (about 83.5 GB per device)" in fields[path]
    # The way out it names: 4-bit fits the pair class's 80 GB, the smallest that holds it.
    quantized = payload("meta-llama/Meta-Llama-3-70B")
    quantized["pretrainedmodel_config"]["use_quantization"] = True
    job_id = client.post(URL, json=quantized).json()["job_id"]
    assert client.get(f"{URL}/{job_id}").json()["device_class"] == "pair"


def test_the_dry_run_says_which_class_and_how_the_memory_was_estimated(
        client: TestClient, tmp_path: Path) -> None:
    # A local model folder: its size is its safetensors' (3 GB, read as 16-bit weights).
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    with (folder / "model.safetensors").open("wb") as weights:
        weights.truncate(3 * 2**30)  # sparse

    local = client.post(f"{URL}?dry_run=true", json=payload(str(folder))).json()
    unknown = client.post(f"{URL}?dry_run=true", json=payload("openai-community/gpt2")).json()

    assert local["device_class"] == {
        "name": "small", "devices": 1, "memory_gb": 8.0, "memory_needed_gb": 5.8,
        "estimate": "about 5.8 GB per device for 1.61B parameters from its 3.0 GB of "
                    "safetensors"}
    assert (unknown["device_class"]["name"], unknown["device_class"]["memory_needed_gb"]) == (
        "small", None)
    assert unknown["device_class"]["estimate"].startswith("memory not checked")


def test_a_resumed_job_is_woken_on_the_queue_of_its_class(client: TestClient) -> None:
    job_id = client.post(URL, json=payload(devices=2)).json()["job_id"]
    assert client.post(f"{URL}/{job_id}/pause").json()["status"] == "PAUSED"

    resumed = client.post(f"{URL}/{job_id}/resume").json()

    assert (resumed["status"], resumed["device_class"]) == ("QUEUED", "pair")
    assert count_waiting_messages("pair") == 2  # the submit's and the resume's


def test_an_openai_job_is_routed_and_shows_its_class(client: TestClient) -> None:
    file_id = upload(client, chat_lines(12)).json()["id"]

    job = create(client, file_id).json()
    too_large = create(client, file_id, model="meta-llama/Meta-Llama-3-70B")

    assert job["tunery_device_class"] == "small"
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["tunery_device_class"] == \
        "small"
    assert count_waiting_messages("small") == 1
    assert too_large.status_code == 400, too_large.text
    error = too_large.json()["error"]
    assert error["param"] == "model" and "about 165.0 GB per device needed" in error["message"]


def test_an_export_goes_to_the_queue_of_its_job_s_class(client: TestClient) -> None:
    from shared import jobs
    from shared.models import JobStatus
    from shared.queue import EXPORT_TASK, TRAIN_TASK, get_celery

    job_id = client.post(URL, json=payload(devices=2)).json()["job_id"]
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)

    exported = client.post(f"{URL}/{job_id}/exports", json={"format": "merged"})

    assert exported.status_code == 202, exported.text
    with get_celery().connection_for_read() as conn:
        queue = conn.SimpleQueue("pair", no_ack=True)
        tasks = [queue.get(timeout=5).headers["task"] for _ in range(2)]
        queue.close()
    assert tasks == [TRAIN_TASK, EXPORT_TASK]
    assert count_waiting_messages("small") == 0
