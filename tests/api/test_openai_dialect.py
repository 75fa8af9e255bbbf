"""OpenAI's fine-tuning dialect in process: files, jobs, events, checkpoints and errors as
the official SDK reads them, over the same jobs and datasets as the MonsterAPI dialect.
(The SDK itself, unchanged, runs against real processes in tests/e2e/test_openai_client.py.)"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared import jobs
from shared.db import session_scope
from shared.models import Job, JobEvent, JobLog, JobMetric, JobStatus, utcnow
from shared.settings import get_settings
from shared.storage import storage_from_settings
from shared.storage_keys import (
    CHECKPOINT_MARKER,
    INITIAL_ADAPTER_FILE,
    checkpoint_step_prefix,
    job_checkpoint_prefix,
)
from tests.api.conftest import new_key

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def chat_lines(n: int, **extra: Any) -> bytes:
    return "".join(json.dumps({"messages": [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": str(2 * i)},
    ], **extra}) + "\n" for i in range(n)).encode()


def upload(client: TestClient, content: bytes, *, name: str = "train.jsonl",
           purpose: str | None = "fine-tune", headers: dict[str, str] | None = None) -> Any:
    data = {} if purpose is None else {"purpose": purpose}
    return client.post("/v1/files", files={"file": (name, content)}, data=data,
                       headers=headers or {})


def create(client: TestClient, training_file: str, **body: Any) -> Any:
    return client.post("/v1/fine_tuning/jobs",
                       json={"model": MODEL, "training_file": training_file, **body})


def test_a_training_file_is_an_uploaded_dataset_that_reads_back_byte_for_byte(
        client: TestClient) -> None:
    content = chat_lines(12)
    answer = upload(client, content)
    assert answer.status_code == 200, answer.text
    file = answer.json()
    assert file["id"].startswith("file-") and file["object"] == "file"
    assert (file["purpose"], file["status"], file["bytes"], file["filename"]) == (
        "fine-tune", "processed", len(content), "train.jsonl")
    assert client.get(f"/v1/files/{file['id']}").json() == file
    assert client.get(f"/v1/files/{file['id']}/content").content == content
    # The same object through the MonsterAPI dialect's datasets.
    dataset = client.get(f"/v1/datasets/ds_{file['id'].removeprefix('file-')}").json()
    assert (dataset["rows"], dataset["columns"]) == (12, ["messages"])


def test_files_page_by_cursor_until_has_more_is_false_in_either_order(
        client: TestClient) -> None:
    made = [upload(client, chat_lines(10), name=f"f{i}.jsonl").json()["id"] for i in range(3)]
    for order, expected in (("desc", made[::-1]), ("asc", made)):
        seen, after = [], None
        while True:
            params: dict[str, Any] = {"limit": 1, "order": order}
            if after:
                params["after"] = after
            page = client.get("/v1/files", params=params).json()
            assert page["object"] == "list" and len(page["data"]) == 1
            assert page["first_id"] == page["last_id"] == page["data"][0]["id"]
            seen.append(page["data"][0]["id"])
            after = page["last_id"]
            if not page["has_more"]:
                break
        assert seen == expected
    assert client.get("/v1/files", params={"purpose": "fine-tune-results"}).json()["data"] == []


def test_an_upload_without_the_training_purpose_is_a_400_naming_purpose(
        client: TestClient) -> None:
    for purpose, said in ((None, "field required"), ("batch", "not supported")):
        answer = upload(client, chat_lines(10), purpose=purpose)
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["param"] == "purpose" and said in error["message"]
        assert answer.headers["x-should-retry"] == "false"


def test_errors_take_openai_envelope_and_status_codes_only_on_its_routes(
        app_client: TestClient) -> None:
    missing = app_client.get("/v1/files/file-0", headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.json()["error"]["code"] == "invalid_api_key"
    monster = app_client.get("/v1/finetune/llm", headers={"Authorization": "Bearer nope"})
    assert set(monster.json()["error"]) == {"code", "message", "fields"}

    app_client.headers["Authorization"] = f"Bearer {new_key('tenant-e')}"
    not_found = app_client.get("/v1/fine_tuning/jobs/ftjob-nope")
    assert not_found.status_code == 404
    assert not_found.json() == {"error": {
        "message": "no job with id nope", "type": "invalid_request_error", "param": None,
        "code": "not_found"}}
    assert not_found.headers["x-should-retry"] == "false"
    invalid = app_client.post("/v1/fine_tuning/jobs", json={"model": MODEL})
    assert invalid.status_code == 400
    assert invalid.json()["error"]["param"] == "training_file"


def test_a_job_is_a_tunery_job_both_dialects_read(client: TestClient) -> None:
    file_id = upload(client, chat_lines(20)).json()["id"]
    answer = create(client, file_id, suffix="adder", seed=7, metadata={"team": "math"},
                    method={"type": "supervised", "supervised": {"hyperparameters": {
                        "n_epochs": 2, "batch_size": 6}}})
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert (job["status"], job["model"], job["training_file"], job["seed"]) == (
        "queued", MODEL, file_id, 7)
    assert job["hyperparameters"] == {"batch_size": 6, "learning_rate_multiplier": "auto",
                                      "n_epochs": 2, "beta": None}
    assert job["method"]["type"] == "supervised"
    assert (job["metadata"], job["user_provided_suffix"]) == ({"team": "math"}, "adder")
    assert job["fine_tuned_model"] is None and job["error"] is None

    monster = client.get(f"/v1/finetune/llm/{job['tunery_job_id']}").json()
    assert monster["status"] == "QUEUED"
    training = monster["payload"]["training_config"]
    # 6 examples a step: micro-batches of 3, two of them.
    assert (training["micro_batch_size"], training["gradient_accumulation_steps"]) == (3, 2)
    assert (training["num_train_epochs"], training["seed"]) == (2, 7)
    assert monster["payload"]["data_config"]["prompt_template"] == "{messages}"
    # ... and a MonsterAPI job through OpenAI's.
    assert client.get(f"/v1/fine_tuning/jobs/{job['tunery_job_id']}").json()["id"] == job["id"]


@pytest.mark.parametrize(("epochs", "shown"), [(0.34, 0.34), (2, 2), (1.0, 1)])
def test_a_monsterapi_jobs_epochs_read_through_openais_dialect_fraction_and_all(
        client: TestClient, epochs: float, shown: float) -> None:
    from tests.conftest import make_payload

    submitted = client.post("/v1/finetune/llm",
                            json=make_payload(training_config={"num_train_epochs": epochs}))
    job_id = submitted.json()["job_id"]
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert job.status_code == 200, job.text
    n_epochs = job.json()["hyperparameters"]["n_epochs"]
    assert n_epochs == shown and type(n_epochs) is type(shown)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events").status_code == 200


def test_a_bad_training_file_makes_a_failed_job_with_openai_error_code(
        client: TestClient) -> None:
    few = upload(client, chat_lines(7)).json()["id"]
    job = create(client, few).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_n_examples" and "7" in job["error"]["message"]
    assert job["error"]["param"] == "training_file"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in reversed(events)] == [
        f"Validating training file: {few}", f"File validation failed: {job['error']['message']}"]
    assert events[0]["level"] == "error"
    robot = json.loads(chat_lines(1))
    robot["messages"][1]["role"] = "robot"
    lines = chat_lines(11) + (json.dumps(robot) + "\n").encode()
    bad = create(client, upload(client, lines).json()["id"]).json()
    assert bad["error"]["code"] == "invalid_training_file"
    assert "line 12" in bad["error"]["message"]


def test_a_validation_file_is_the_jobs_validation_dataset_and_never_stops_it_early(
        client: TestClient) -> None:
    training = upload(client, chat_lines(20)).json()["id"]
    validation = upload(client, chat_lines(3), name="valid.jsonl").json()["id"]
    job = create(client, training, validation_file=validation).json()
    assert job["status"] == "queued", job
    assert (job["training_file"], job["validation_file"]) == (training, validation)
    payload = client.get(f"/v1/finetune/llm/{job['tunery_job_id']}").json()["payload"]
    assert payload["data_config"]["validation_data_path"] == "ds_" + validation.removeprefix(
        "file-")
    assert payload["data_config"]["data_split_config"] == {"train": 1.0, "validation": 0.0}
    assert payload["training_config"]["early_stopping_patience"] == 100_000
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[-1]["message"] == (f"Validating training file: {training} and validation "
                                     f"file: {validation}")
    # Without one, nothing changes: every line trains and patience is the default.
    plain = create(client, training).json()
    plain_payload = client.get(f"/v1/finetune/llm/{plain['tunery_job_id']}").json()["payload"]
    assert plain_payload["data_config"]["validation_data_path"] is None
    assert plain_payload["training_config"]["early_stopping_patience"] == 5


def test_a_bad_validation_file_fails_the_job_with_invalid_validation_file(
        client: TestClient) -> None:
    training = upload(client, chat_lines(12)).json()["id"]
    robot = json.loads(chat_lines(1))
    robot["messages"][1]["role"] = "robot"
    broken = upload(client, chat_lines(2) + (json.dumps(robot) + "\n").encode()).json()["id"]
    completions = upload(client, "".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(
        2 * i)}) + "\n" for i in range(5)).encode()).json()["id"]

    bad_line = create(client, training, validation_file=broken).json()
    other_format = create(client, training, validation_file=completions).json()

    for job in (bad_line, other_format):
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "invalid_validation_file"
        assert job["error"]["param"] == "validation_file"
    assert bad_line["error"]["message"].startswith(f"Invalid validation file {broken}: line 3")
    assert (f"Validation file {completions} is in the fine-tune-completion format, but the "
            "training file is in the fine-tune-chat format") in other_format["error"]["message"]
    # The training file's own problem comes first, naming training_file.
    few = upload(client, chat_lines(7)).json()["id"]
    both = create(client, few, validation_file=broken).json()
    assert (both["error"]["code"], both["error"]["param"]) == ("invalid_n_examples",
                                                               "training_file")


@pytest.mark.parametrize(("body", "param"), [
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"model": "gpt-4o-mini-2024-07-18"}, "model"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"learning_rate": 0.1}, "learning_rate"),
    ({"training_file": "file-00000000000000000000000000000000"}, "training_file"),
    ({"validation_file": "file-00000000000000000000000000000000"}, "validation_file"),
    ({"method": {"type": "supervised", "dpo": {}}}, "method"),
    ({"method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}}}, "method"),
    ({"suffix": "../x:y"}, "suffix"),
    ({"metadata": {"k\x00": "v"}}, "metadata"),
    ({"metadata": {"k": "v\x00"}}, "metadata"),
    ({"metadata": {'owner"||1||"': "v"}}, "metadata"),
])
def test_a_wrong_creation_is_a_400_naming_the_field_and_makes_no_job(
        client: TestClient, body: dict[str, Any], param: str) -> None:
    file_id = upload(client, chat_lines(10)).json()["id"]
    answer = client.post("/v1/fine_tuning/jobs",
                         json={"model": MODEL, "training_file": file_id, **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_jobs_page_newest_first_and_filter_by_metadata(client: TestClient) -> None:
    file_id = upload(client, chat_lines(10)).json()["id"]
    made = [create(client, file_id, metadata={"n": str(i % 2)}).json()["id"] for i in range(3)]
    seen, after = [], None
    while True:
        page = client.get("/v1/fine_tuning/jobs",
                          params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [j["id"] for j in page["data"]]
        after = page["data"][-1]["id"]
        if not page["has_more"]:
            break
    assert seen == made[::-1]
    evens = client.get("/v1/fine_tuning/jobs", params={"metadata[n]": "0"}).json()["data"]
    assert [j["id"] for j in evens] == [made[2], made[0]]
    odd = client.get("/v1/fine_tuning/jobs", params={"metadata[n]": "1", "limit": 1}).json()
    assert [j["id"] for j in odd["data"]] == [made[1]] and odd["has_more"] is False
    stray = client.get("/v1/fine_tuning/jobs", params={"status": "failed"})
    assert stray.status_code == 400 and stray.json()["error"]["param"] == "status"
    for key in ("k\x00", 'owner"||1||"', "a\\b"):
        odd = client.get("/v1/fine_tuning/jobs", params={f"metadata[{key}]": "x"})
        assert odd.status_code == 400 and odd.json()["error"]["param"] == "metadata", odd.text
    stray_file = client.get("/v1/files", params={"bogus": "1"})
    assert stray_file.status_code == 400 and stray_file.json()["error"]["param"] == "bogus"


def _finish(job_id: str, steps: int) -> None:
    """What a worker writes for a job that trains `steps` steps and completes."""
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "worker-test", 60)
        assert claim is not None
        session.flush()  # the claim's event takes its time now, before what follows
        start = utcnow()
        for step in range(1, steps + 1):
            session.add(JobMetric(job_id=job_id, attempt=1, step=step,
                                  at=start + timedelta(microseconds=step),
                                  values={"loss": 2.0 / step, "mean_token_accuracy": 0.25 * step,
                                          "total_steps": float(steps)}))
        session.add(JobMetric(job_id=job_id, attempt=1, step=steps,
                              at=start + timedelta(microseconds=steps + 1),
                              values={"eval_loss": 0.5, "eval_mean_token_accuracy": 0.75}))
        session.add(JobLog(job_id=job_id, attempt=1, line="loading data", at=start))
        session.flush()
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=1,
                               result={"steps": steps, "trained_tokens": 1234})


def test_events_page_newest_first_by_cursor_and_read_as_openai_words_them(
        client: TestClient) -> None:
    file_id = upload(client, chat_lines(10)).json()["id"]
    job = create(client, file_id, suffix="s").json()
    _finish(job["tunery_job_id"], steps=4)
    seen, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if after:
            params["after"] = after
        page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params=params).json()
        seen += page["data"]
        after = page["data"][-1]["id"]
        if not page["has_more"]:
            break
    messages = [e["message"] for e in reversed(seen)]
    assert len({e["id"] for e in seen}) == len(seen) == 11
    assert messages[:3] == [f"Validating training file: {file_id}",
                            "Files validated, moving job to queued state",
                            "Fine-tuning job started"]
    finished = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert messages[-2:] == [f"New fine-tuned model created: {finished['fine_tuned_model']}",
                             "The job has successfully completed"]
    metrics = [e for e in reversed(seen) if e["type"] == "metrics"]
    assert metrics[0]["message"] == "Step 1/4: training loss=2.0000"
    assert metrics[0]["data"] == {"step": 1, "total_steps": 4, "train_loss": 2.0,
                                  "train_mean_token_accuracy": 0.25}
    assert metrics[-1]["data"] == {"step": 4, "valid_loss": 0.5,
                                   "valid_mean_token_accuracy": 0.75}
    assert finished["status"] == "succeeded" and finished["trained_tokens"] == 1234
    assert finished["fine_tuned_model"] == f"ft:{MODEL}:tenant-a:s:{job['tunery_job_id'][:8]}"
    assert finished["hyperparameters"]["n_epochs"] == 10  # auto: 100 examples seen at least


def test_a_succeeded_job_has_a_result_file_of_openai_csv_columns(client: TestClient) -> None:
    job = create(client, upload(client, chat_lines(10)).json()["id"]).json()
    _finish(job["tunery_job_id"], steps=2)
    result_id = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["result_files"][0]
    file = client.get(f"/v1/files/{result_id}").json()
    assert (file["purpose"], file["filename"]) == ("fine-tune-results", "step_metrics.csv")
    served = client.get(f"/v1/files/{result_id}/content").content
    assert base64.b64decode(served).decode().splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy",
        "1,2.0,0.25,,", "2,1.0,0.5,0.5,0.75"]
    assert file["bytes"] == len(base64.b64decode(served))
    assert client.delete(f"/v1/files/{result_id}").status_code == 400  # it goes with its job
    unknown = "file-result-" + "0" * 32
    assert client.delete(f"/v1/files/{unknown}").status_code == 404


def test_checkpoints_list_newest_first_with_metrics_and_a_downloadable_adapter(
        client: TestClient) -> None:
    job = create(client, upload(client, chat_lines(10)).json()["id"]).json()
    job_id = job["tunery_job_id"]
    storage = storage_from_settings(get_settings())
    for step in (2, 4):
        folder = checkpoint_step_prefix(job_checkpoint_prefix(job_id), step)
        storage.put_bytes(folder + "adapter_model.safetensors", b"weights" * step)
        storage.put_bytes(folder + "adapter_config.json", b"{}")
        storage.put_bytes(folder + "optimizer.pt", b"state")
        storage.put_bytes(folder + CHECKPOINT_MARKER, b"{}")
    _finish(job_id, steps=4)
    page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 1}).json()
    newest = page["data"][0]
    assert (newest["step_number"], page["has_more"]) == (4, True)
    assert newest["metrics"]["train_loss"] == 0.5 and newest["metrics"]["valid_loss"] == 0.5
    assert newest["metrics"]["train_mean_token_accuracy"] == 1.0
    assert newest["metrics"]["valid_mean_token_accuracy"] == 0.75
    assert newest["fine_tuned_model_checkpoint"].endswith(":ckpt-step-4")
    rest = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints",
                      params={"after": newest["id"]}).json()
    assert [c["step_number"] for c in rest["data"]] == [2] and rest["has_more"] is False
    archive = client.get(newest["download_url"])
    assert archive.status_code == 200 and archive.content[:2] == b"\x1f\x8b"


def test_a_pissa_checkpoints_archive_carries_its_initial_adapter(client: TestClient) -> None:
    import io
    import tarfile

    job = create(client, upload(client, chat_lines(10)).json()["id"]).json()
    job_id = job["tunery_job_id"]
    storage = storage_from_settings(get_settings())
    folder = checkpoint_step_prefix(job_checkpoint_prefix(job_id), 2)
    for name in ("adapter_model.safetensors", "adapter_config.json", INITIAL_ADAPTER_FILE,
                 "optimizer.pt", CHECKPOINT_MARKER):
        storage.put_bytes(folder + name, b"x")
    _finish(job_id, steps=2)
    checkpoint = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][0]
    archive = client.get(checkpoint["download_url"])
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        names = sorted(name.rsplit("/", 1)[-1] for name in tar.getnames())
    assert names == ["adapter_config.json", "adapter_model.safetensors", INITIAL_ADAPTER_FILE]


def test_another_tenants_files_and_jobs_are_404_through_every_route(
        client: TestClient, app_client: TestClient) -> None:
    file_id = upload(client, chat_lines(10)).json()["id"]
    job = create(client, file_id).json()
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    for method, path in (
        ("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"), ("GET", f"/v1/fine_tuning/jobs/{job['id']}"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/pause"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/resume"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"),
    ):
        answer = app_client.request(method, path, headers=other)
        assert answer.status_code == 404, (method, path, answer.text)
    stolen = app_client.post("/v1/fine_tuning/jobs", headers=other,
                             json={"model": MODEL, "training_file": file_id})
    assert stolen.status_code == 400 and stolen.json()["error"]["param"] == "training_file"
    assert app_client.get("/v1/fine_tuning/jobs", headers=other).json()["data"] == []
    assert app_client.get("/v1/files", headers=other).json()["data"] == []


def test_cancelling_a_finished_job_is_a_400_that_says_not_to_retry(client: TestClient) -> None:
    job = create(client, upload(client, chat_lines(10)).json()["id"]).json()
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 400 and again.headers["x-should-retry"] == "false"
    with session_scope() as session:
        assert session.get(Job, job["tunery_job_id"]).status == JobStatus.CANCELLED.value
        reasons = [e.to_status for e in session.query(JobEvent).filter_by(
            job_id=job["tunery_job_id"])]
    assert reasons == ["QUEUED", "CANCELLED"]


def preference_lines(n: int) -> bytes:
    return "".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
        "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
        "non_preferred_output": [{"role": "assistant", "content": "I cannot say."}],
    }) + "\n" for i in range(n)).encode()


def test_a_dpo_job_trains_the_preference_file_with_its_beta(client: TestClient) -> None:
    file_id = upload(client, preference_lines(10)).json()["id"]
    job = create(client, file_id, method={"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.2, "n_epochs": 1}}}).json()
    assert job["status"] == "queued", job
    assert job["method"]["type"] == "dpo"
    assert job["hyperparameters"]["beta"] == 0.2
    training = client.get(f"/v1/finetune/llm/{job['tunery_job_id']}").json()["payload"][
        "training_config"]
    assert (training["preference_optimization"], training["beta"]) == ("DPO", 0.2)
    auto = create(client, file_id, method={"type": "dpo"}).json()
    _finish(auto["tunery_job_id"], steps=1)
    assert client.get(f"/v1/fine_tuning/jobs/{auto['id']}").json()["hyperparameters"][
        "beta"] == 0.1


def test_a_file_of_the_other_method_fails_the_job_with_openai_words(client: TestClient) -> None:
    preference = upload(client, preference_lines(10)).json()["id"]
    supervised = create(client, preference).json()
    assert supervised["status"] == "failed"
    assert supervised["error"]["code"] == "invalid_training_file"
    assert ("is in the fine-tune-preference format, but the specified fine-tuning job is not "
            "using 'dpo'") in supervised["error"]["message"]
    chat = upload(client, chat_lines(10)).json()["id"]
    dpo = create(client, chat, method={"type": "dpo"}).json()
    assert dpo["status"] == "failed" and dpo["error"]["code"] == "invalid_training_file"
    assert "supervised" in dpo["error"]["message"]
