"""The preflight: `POST /v1/finetune/llm?dry_run=true` answers what a job would train or one 422
naming every problem, and the plain submit refuses the same mistakes before queueing.

The Hugging Face hub is the edge of what this machine can reach (no internet here): a real
HTTP server on 127.0.0.1, in a thread of the test process, answers as the hub's metadata API
does (`/api/models/{id}`, `/api/datasets/{id}`), and TUNERY_HUB_ENDPOINT points at it.
Everything else is the real app, database and storage.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared.db import session_scope
from shared.models import Dataset, Job
from shared.settings import get_settings
from tests.api.conftest import new_key
from tests.api.test_datasets import upload_ok
from tests.conftest import make_payload

URL = "/v1/finetune/llm"
DRY_RUN = f"{URL}?dry_run=true"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRIVATE_MODEL = "me/private-model"
HUB_TOKEN = "hf_can_read_private"
SLOW_MODEL = "slow/model"
HUB_TIMEOUT_S = 0.5
PUBLIC = {"models": {MODEL, "gpt2"}, "datasets": {"tatsu-lab/alpaca"}}
ALPACA_ROWS = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}"} for i in range(40)]
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                  {"role": "assistant", "content": f"{2 * i}"}]}
    for i in range(40)
]


class FakeHub(BaseHTTPRequestHandler):
    """The hub's metadata API as huggingface.co answers it: 200 with the repo's metadata; 401
    for a repo that does not exist or is private without a token that reads it, 404 for one
    that does not exist when a valid token is sent."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        FakeHub.requests.append(self.path)
        kind, _, repo_id = self.path.removeprefix("/api/").partition("/")
        if repo_id == SLOW_MODEL:
            time.sleep(HUB_TIMEOUT_S * 4)
        token_ok = self.headers.get("Authorization") == f"Bearer {HUB_TOKEN}"
        if repo_id in PUBLIC.get(kind, set()) or (repo_id == PRIVATE_MODEL and token_ok):
            self._answer(200, {"id": repo_id, "private": repo_id == PRIVATE_MODEL})
        elif token_ok:
            self._answer(404, {"error": "Repository not found"})
        else:
            self._answer(401, {"error": "Repository not found"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("TUNERY_HUB_ENDPOINT", endpoint)
    monkeypatch.setenv("TUNERY_HUB_CHECK_TIMEOUT_S", str(HUB_TIMEOUT_S))
    get_settings.cache_clear()  # the routes read settings per request


@pytest.fixture
def hub(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The fake hub, serving; yields the paths it was asked for."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.daemon_threads = True
    server.block_on_close = False  # a slow answer must not hold up the teardown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.requests = []
    point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield FakeHub.requests
    finally:
        server.shutdown()
        server.server_close()


def refused(response: Any) -> dict[str, str]:
    """The 422's fields as {path: message}."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    return {f["path"]: f["message"] for f in error["fields"]}


def report(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is True
    return dict(body)


def jobs_stored() -> list[Job]:
    with session_scope() as session:
        return list(session.scalars(select(Job)).all())


def uploaded(client: TestClient, rows: list[dict[str, Any]]) -> str:
    return str(upload_ok(client, "jsonl", rows)["id"])


def with_data(dataset_id: str, **data: Any) -> dict[str, Any]:
    return make_payload(MODEL, data_config={"data_path": dataset_id, **data})


# --- data_path: mistakes found before the queue ------------------------------------------


@pytest.mark.parametrize("url", [URL, DRY_RUN])
def test_a_dataset_id_that_cannot_exist_says_no_dataset_has_it(
    client: TestClient, hub: list[str], url: str
) -> None:
    fields = refused(client.post(url, json=make_payload(MODEL, "ds_doesnotexist")))

    assert fields["data_config.data_path"].startswith("no dataset with id ds_doesnotexist")
    assert jobs_stored() == []


def test_a_file_name_as_data_path_says_what_data_path_may_be_and_how_to_upload(
    client: TestClient, hub: list[str]
) -> None:
    message = refused(client.post(DRY_RUN, json=make_payload(MODEL, "train.jsonl")))[
        "data_config.data_path"]

    assert "neither an uploaded dataset id" in message
    assert "'owner/name'" in message
    assert "TUNERY_ALLOWED_LOCAL_DIRS" in message
    assert "upload it with POST /v1/datasets" in message
    assert not [path for path in hub if "/datasets/" in path]  # refused by its grammar


def test_dry_run_refuses_a_hub_dataset_the_hub_does_not_have(
    client: TestClient, hub: list[str]
) -> None:
    fields = refused(client.post(DRY_RUN, json=make_payload(MODEL, "tatsu-lab/alpacca")))

    assert fields["data_config.data_path"].startswith("no dataset 'tatsu-lab/alpacca' on the hub")
    assert "/api/datasets/tatsu-lab/alpacca" in hub


@pytest.mark.parametrize("url", [URL, DRY_RUN])
def test_presigned_link_type_needs_an_uploaded_dataset_or_a_url(
    client: TestClient, hub: list[str], url: str
) -> None:
    presigned = {"data_source_type": "s3_presigned_link"}
    unknown = make_payload(MODEL, "ds_" + "0" * 32, data_config=presigned)
    hub_id = make_payload(MODEL, "tatsu-lab/alpaca", data_config=presigned)

    assert refused(client.post(url, json=unknown)) == {
        "data_config.data_path": "no dataset with id ds_" + "0" * 32
                                 + "; GET /v1/datasets lists yours"}
    assert "needs an https URL or an uploaded dataset id" in refused(
        client.post(url, json=hub_id))["data_config.data_source_type"]
    assert jobs_stored() == []


def test_presigned_link_type_with_an_uploaded_dataset_passes(
    client: TestClient, hub: list[str]
) -> None:
    dataset_id = uploaded(client, ALPACA_ROWS)
    payload = with_data(dataset_id, data_source_type="s3_presigned_link",
                        prompt_template="Q: {instruction} A: {output}")

    assert report(client.post(DRY_RUN, json=payload))["dataset"]["kind"] == "uploaded"


# --- model_path ------------------------------------------------------------------------


@pytest.mark.parametrize("url", [URL, DRY_RUN])
@pytest.mark.parametrize(("model", "named"), [
    ({"lora_init": "loftq"}, "use_quantization true"),
    ({"lora_init": "pissa", "use_quantization": True}, "use_quantization false"),
    ({"lora_init": "olora", "use_dora": True}, "use_dora false"),
], ids=["loftq-unquantized", "pissa-4bit", "olora-dora"])
def test_a_lora_variant_peft_cannot_train_is_refused_before_the_queue(
    client: TestClient, hub: list[str], url: str, model: dict[str, Any], named: str
) -> None:
    fields = refused(client.post(url, json=make_payload(
        MODEL, "tatsu-lab/alpaca", pretrainedmodel_config=model)))

    assert list(fields) == ["pretrainedmodel_config.lora_init"]
    assert named in fields["pretrainedmodel_config.lora_init"]
    assert jobs_stored() == []


def test_dry_run_refuses_a_hub_model_the_hub_does_not_have(
    client: TestClient, hub: list[str]
) -> None:
    fields = refused(client.post(DRY_RUN, json=make_payload("HuggingFaceTB/SmolLM2-135M-Instrut")))

    message = fields["pretrainedmodel_config.model_path"]
    assert message.startswith("no model 'HuggingFaceTB/SmolLM2-135M-Instrut' on the hub")
    assert "hf_config.hf_token" in message  # the hub answers a private repo the same
    assert jobs_stored() == []


def test_a_private_hub_model_is_found_with_the_jobs_token(
    client: TestClient, hub: list[str]
) -> None:
    payload = make_payload(PRIVATE_MODEL, "tatsu-lab/alpaca")
    payload["hf_config"] = {"hf_token": HUB_TOKEN}

    model = report(client.post(DRY_RUN, json=payload))["model"]

    assert model == {"kind": "hub", "model_path": PRIVATE_MODEL, "checked": "found on the hub"}


def test_a_hub_that_does_not_answer_in_time_leaves_the_model_unchecked(
    client: TestClient, hub: list[str]
) -> None:
    started = time.monotonic()
    body = report(client.post(DRY_RUN, json=make_payload(SLOW_MODEL, "tatsu-lab/alpaca")))

    assert time.monotonic() - started < HUB_TIMEOUT_S * 3
    assert body["model"]["checked"].startswith("not checked: the hub")
    assert any(w.startswith("pretrainedmodel_config.model_path: not checked: the hub")
               for w in body["warnings"])


def test_a_hub_that_cannot_be_reached_is_a_warning_not_an_error(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as closed:  # a port nothing listens on once closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")

    body = report(client.post(DRY_RUN, json=make_payload(MODEL, "tatsu-lab/alpaca")))

    unchecked = [w for w in body["warnings"] if "not checked: the hub" in w]
    assert [w.split(":")[0] for w in unchecked] == [
        "pretrainedmodel_config.model_path", "data_config.data_path"]
    assert all("could not be reached" in w for w in unchecked)


def test_a_plain_submit_does_not_wait_on_the_hub(client: TestClient, hub: list[str]) -> None:
    response = client.post(URL, json=make_payload("HuggingFaceTB/SmolLM2-135M-Instrut",
                                                  "tatsu-lab/alpaca"))

    assert response.status_code == 201, response.text
    assert hub == []


def model_folder(root: Path, *names: str) -> Path:
    root.mkdir()
    for name in names:
        (root / name).write_bytes(b"{}")
    return root


@pytest.mark.parametrize("url", [URL, DRY_RUN])
def test_a_model_folder_without_a_model_is_refused_naming_what_it_lacks(
    client: TestClient, hub: list[str], tmp_path: Path, url: str
) -> None:
    folder = model_folder(tmp_path / "not-a-model", "README.md")

    message = refused(client.post(url, json=make_payload(str(folder), "tatsu-lab/alpaca")))[
        "pretrainedmodel_config.model_path"]

    assert "holds no model the worker can load" in message
    assert "no config.json" in message
    assert "no weights as *.safetensors" in message
    assert "no tokenizer (one of tokenizer.json, tokenizer.model, tokenizer_config.json)" in message


def test_a_model_folder_with_pickled_weights_only_says_to_convert_them(
    client: TestClient, hub: list[str], tmp_path: Path
) -> None:
    folder = model_folder(tmp_path / "bin-model", "config.json", "pytorch_model.bin",
                          "tokenizer.json")

    message = refused(client.post(DRY_RUN, json=make_payload(str(folder), "tatsu-lab/alpaca")))[
        "pretrainedmodel_config.model_path"]

    assert message.endswith("no weights as *.safetensors (it has ['pytorch_model.bin']: the "
                            "worker loads only safetensors; convert them)")


def test_a_model_folder_with_config_weights_and_tokenizer_passes(
    client: TestClient, hub: list[str], tmp_path: Path
) -> None:
    folder = model_folder(tmp_path / "model", "config.json", "model.safetensors",
                          "tokenizer_config.json", "tokenizer.model")

    model = report(client.post(DRY_RUN, json=make_payload(str(folder), "tatsu-lab/alpaca")))[
        "model"]

    assert model["kind"] == "local"
    assert model["checked"] == "the folder holds config.json, safetensors weights and a tokenizer"


# --- defaults a payload leans on --------------------------------------------------------


def test_a_left_out_prompt_template_is_a_warning_naming_the_default(
    client: TestClient, hub: list[str]
) -> None:
    payload = with_data(uploaded(client, ALPACA_ROWS))
    del payload["data_config"]["prompt_template"]

    body = report(client.post(DRY_RUN, json=payload))

    assert body["template"]["is_default"] is True
    assert body["template"]["columns"] == ["instruction", "output"]
    assert any(w.startswith("data_config.prompt_template left out: training uses the default "
                            "template 'Here is an example on how to use tatsu-lab/alpaca")
               for w in body["warnings"])


def test_a_left_out_data_path_is_a_warning_naming_tatsu_lab_alpaca(
    client: TestClient, hub: list[str]
) -> None:
    payload = make_payload(MODEL)
    del payload["data_config"]["data_path"]

    body = report(client.post(DRY_RUN, json=payload))

    assert ("data_config.data_path left out: training uses the default dataset "
            "tatsu-lab/alpaca") in body["warnings"]
    assert body["dataset"]["kind"] == "hub"
    assert body["dataset"]["checked"] == ("found on the hub; rows unknown until the worker "
                                          "reads it")
    assert body["steps"]["optimizer_steps"] is None
    assert body["steps"]["note"] == "unknown until the worker reads the dataset"


# --- one answer for every error ---------------------------------------------------------


@pytest.mark.parametrize("url", [URL, DRY_RUN])
def test_missing_sections_and_a_wrong_column_are_named_in_one_answer(
    client: TestClient, hub: list[str], url: str
) -> None:
    payload = with_data(uploaded(client, ALPACA_ROWS), prompt_template="Q: {question} A: {output}")
    del payload["training_config"], payload["logging_config"]

    fields = refused(client.post(url, json=payload))

    for section in ("training_config", "logging_config"):
        assert fields[section] == (f'Field required; every field inside has a default, so '
                                   f'"{section}": {{}} is enough')
    assert fields["data_config.prompt_template"].startswith(
        "prompt_template uses columns the dataset does not have: ['question']")
    assert jobs_stored() == []


def test_schema_errors_limits_and_sources_are_named_together(
    client: TestClient, hub: list[str]
) -> None:
    payload = make_payload("HuggingFaceTB/SmolLM2-135M-Instrut", "tatsu-lab/alpaca",
                           training_config={"learning_rate": 5})
    payload["data_config"]["cutoff_len"] = get_settings().limits.max_cutoff_len + 1

    fields = refused(client.post(DRY_RUN, json=payload))

    assert set(fields) == {"training_config.learning_rate", "data_config.cutoff_len",
                           "pretrainedmodel_config.model_path"}


def test_cross_section_rule_is_named_with_the_other_schema_errors(
    client: TestClient, hub: list[str]
) -> None:
    payload = make_payload(MODEL, "tatsu-lab/alpaca",
                           data_config={"data_split_config": {"train": 1.0}})
    payload["logging_config"] = {"use_wandb": "maybe"}

    fields = refused(client.post(URL, json=payload))

    assert set(fields) == {"logging_config.use_wandb", "body"}
    assert "reduce_lr_on_plateau' needs a validation split" in fields["body"]


# --- the report -------------------------------------------------------------------------


def test_dry_run_reports_a_chat_dataset_and_creates_nothing(
    client: TestClient, hub: list[str]
) -> None:
    dataset_id = uploaded(client, CHAT_ROWS)
    payload = with_data(dataset_id, prompt_template="{messages}")
    payload["training_config"]["lr_scheduler_type"] = "cosine"

    body = report(client.post(DRY_RUN, json=payload))

    assert body["dataset"] == {
        "kind": "uploaded", "data_path": dataset_id, "checked": "your uploaded dataset "
        "'train.jsonl'", "rows": 40, "train_rows": 36, "validation_rows": 4,
        "columns": ["messages"], "format": "jsonl", "csv_delimiter": None,
    }
    assert body["model"] == {"kind": "hub", "model_path": MODEL, "checked": "found on the hub"}
    assert body["template"] == {"mode": "chat", "prompt_template": "{messages}",
                                "is_default": False, "columns": ["messages"]}
    # 36 examples in batches of 4: 9 optimizer steps, and 50 warm-up steps are cut to 0.
    assert body["steps"]["optimizer_steps"] == 9
    assert body["steps"]["warmup_steps"] == 0
    assert body["warnings"][0].startswith("warm-up capped from 50 to 0 steps")
    assert len(body["examples"]) == 5
    assert body["examples"][1] | {"tokens": None} == {
        "prompt": "user: What is 1 + 1?\nassistant: ", "completion": "2", "prompt_cut": False,
        "completion_cut": False, "problem": None, "tokens": None}
    assert jobs_stored() == []


def test_dry_run_counts_the_optimizer_steps_with_the_jobs_micro_batch_size(
    client: TestClient, hub: list[str]
) -> None:
    payload = with_data(uploaded(client, CHAT_ROWS), prompt_template="{messages}")
    payload["training_config"].update(lr_scheduler_type="cosine", micro_batch_size=2,
                                      gradient_accumulation_steps=4)

    steps = report(client.post(DRY_RUN, json=payload))["steps"]

    # 36 examples in micro-batches of 2, 4 of them a step: 18 micro-batches, 5 steps.
    assert (steps["train_examples"], steps["batch_size"]) == (36, 2)
    assert steps["optimizer_steps"] == 5


def test_dry_run_of_dpo_on_openai_preference_rows_reads_their_columns_and_no_template(
    client: TestClient, hub: list[str]
) -> None:
    rows = [{"input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"{2 * i}"}],
             "non_preferred_output": [{"role": "assistant", "content": "No idea."}]}
            for i in range(40)]
    payload = with_data(uploaded(client, rows))
    payload["training_config"].update(preference_optimization="DPO", beta=0.2,
                                      lr_scheduler_type="cosine")

    body = report(client.post(DRY_RUN, json=payload))

    assert (body["template"]["mode"], body["template"]["columns"]) == (
        "dpo", ["input", "preferred_output", "non_preferred_output"])
    assert body["examples"] == []
    assert not any("prompt_template" in warning for warning in body["warnings"])
    assert body["steps"]["optimizer_steps"] == 9


def test_two_rows_with_the_default_warmup_warn_of_the_cut_warmup_and_few_examples(
    client: TestClient, hub: list[str]
) -> None:
    payload = with_data(uploaded(client, ALPACA_ROWS[:2]),
                        prompt_template="Q: {instruction} A: {output}")
    payload["training_config"]["lr_scheduler_type"] = "linear"

    body = report(client.post(DRY_RUN, json=payload))

    assert (body["dataset"]["train_rows"], body["dataset"]["validation_rows"]) == (1, 1)
    assert body["steps"] | {"note": None} == {
        "train_examples": 1, "batch_size": 4, "gradient_accumulation_steps": 1,
        "num_train_epochs": 1.0, "optimizer_steps": 1, "warmup_steps_asked": 50,
        "warmup_steps": 0, "note": None, "warmup_warning": body["warnings"][0],
    }
    assert body["warnings"] == [
        "warm-up capped from 50 to 0 steps: training_config.warmup_steps 50 is longer than the "
        "run's 1 optimizer steps, so the learning rate would stay below learning_rate for most "
        "or all of it; a warm-up from 50% of the steps is cut to 10% of them, rounded down: "
        "none for a run this short, which trains at learning_rate from its first step",
        "1 training example, fewer than 16: a model rarely keeps anything it learnt from so few",
    ]
    assert body["examples"][0] == {"prompt": "Q: Add 0 and 0. A: ", "completion": "0",
                                   "prompt_cut": False, "completion_cut": False,
                                   "problem": None, "tokens": None}


def test_a_scheduler_without_warmup_plans_none_and_warns_of_none(
    client: TestClient, hub: list[str]
) -> None:
    payload = with_data(uploaded(client, ALPACA_ROWS[:2]),
                        prompt_template="Q: {instruction} A: {output}")
    assert payload["training_config"]["lr_scheduler_type"] == "reduce_lr_on_plateau"

    body = report(client.post(DRY_RUN, json=payload))

    assert (body["steps"]["warmup_steps_asked"], body["steps"]["warmup_steps"]) == (50, 0)
    assert body["steps"]["note"] == ("lr_scheduler_type 'reduce_lr_on_plateau' has no warm-up: "
                                     "warmup_steps is not used")
    assert not [w for w in body["warnings"] if "warm" in w]


def set_dataset(dataset_id: str, **values: Any) -> None:
    """Write what an upload records (its row count, its CSV delimiter) directly."""
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        assert dataset is not None
        for name, value in values.items():
            setattr(dataset, name, value)


@pytest.mark.parametrize("url", [URL, DRY_RUN])
def test_a_dataset_with_no_rows_to_train_on_is_refused(
    client: TestClient, hub: list[str], url: str
) -> None:
    dataset_id = uploaded(client, ALPACA_ROWS)
    set_dataset(dataset_id, rows=0)  # uploads refuse empty files; an older row may say 0
    payload = with_data(dataset_id, prompt_template="Q: {instruction} A: {output}")

    fields = refused(client.post(url, json=payload))

    assert fields["data_config.data_path"].endswith("the job would train 0 optimizer steps")
    assert jobs_stored() == []


def test_a_csv_read_with_another_delimiter_is_a_warning(
    client: TestClient, hub: list[str]
) -> None:
    dataset_id = uploaded(client, ALPACA_ROWS)
    set_dataset(dataset_id, format="csv", csv_delimiter=";")
    payload = with_data(dataset_id, prompt_template="Q: {instruction} A: {output}")

    body = report(client.post(DRY_RUN, json=payload))

    assert body["dataset"]["csv_delimiter"] == ";"
    assert ("train.jsonl is read as CSV with the delimiter ';' its header suggests, not ','; "
            "its columns are ['instruction', 'output']") in body["warnings"]


def test_openapi_documents_the_body_as_finetune_request_and_the_report(
    client: TestClient,
) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"][URL]["post"]

    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/FinetuneRequest"}
    components = set(schema["components"]["schemas"])
    assert {"FinetuneRequest", "DataConfig", "TrainingConfig"} <= components
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PreflightOut"}
    assert "dry_run" in [p["name"] for p in operation["parameters"]]


def test_a_submit_keeps_the_warnings_the_worker_does_not_restate(
    client: TestClient, hub: list[str]
) -> None:
    """The warm-up and the default template are stated again by the worker from the run it
    really trains; the job keeps the rest of what the preflight found."""
    payload = with_data(uploaded(client, ALPACA_ROWS[:2]))
    del payload["data_config"]["prompt_template"]
    payload["training_config"]["lr_scheduler_type"] = "linear"

    response = client.post(URL, json=payload)

    assert response.status_code == 201, response.text
    job = client.get(f"{URL}/{response.json()['job_id']}").json()
    assert job["warnings"] == [
        "1 training example, fewer than 16: a model rarely keeps anything it learnt from so few"]


def test_a_dry_run_on_a_local_model_shows_the_tokens_the_loss_applies_to(
    client: TestClient, hub: list[str], tunery_env: Path
) -> None:
    # A tokenizer folder built with `tokenizers` alone (no torch in the API's tests), with
    # weights and a config beside it so that the model check passes.
    from tests.api.test_dataset_token_preview import EOS, tokenizer_folder

    folder = tokenizer_folder(tunery_env.parent / "local-model")
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(b"{}")
    payload = with_data(uploaded(client, CHAT_ROWS), prompt_template="{messages}")
    payload["pretrainedmodel_config"]["model_path"] = str(folder)

    body = report(client.post(DRY_RUN, json=payload))

    tokens = body["examples"][0]["tokens"]
    assert tokens is not None
    trained = "".join(part["text"] for part in tokens["parts"] if part["kind"] == "trained")
    # The assistant's answer and the end-of-turn marker, nothing of the user's turn.
    assert trained.strip() == f"0{EOS}"
    assert not any(w.startswith("examples:") for w in body["warnings"])
    assert jobs_stored() == []


# --- validation_data_path: a dataset of the caller's as the validation set ---------------

QA_TEMPLATE = "Q: {instruction} A: {output}"
HELD_OUT_ROWS = [{"instruction": f"Double {i}.", "output": f"{2 * i}"} for i in range(12)]
PREFERENCE_ROWS = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": "No idea."}
                   for i in range(12)]


def with_validation(dataset_id: str, validation_id: str, **data: Any) -> dict[str, Any]:
    return with_data(dataset_id, validation_data_path=validation_id, **data)


def test_a_validation_dataset_is_the_validation_rows_and_data_path_trains_whole(
    client: TestClient, hub: list[str]
) -> None:
    validation_id = uploaded(client, HELD_OUT_ROWS)
    payload = with_validation(uploaded(client, ALPACA_ROWS), validation_id,
                              prompt_template=QA_TEMPLATE)
    assert payload["training_config"]["lr_scheduler_type"] == "reduce_lr_on_plateau"

    body = report(client.post(DRY_RUN, json=payload))

    assert (body["dataset"]["train_rows"], body["dataset"]["validation_rows"]) == (40, 12)
    assert body["dataset"]["checked"] == ("your uploaded dataset 'train.jsonl'; validation: "
                                          "your uploaded dataset 'train.jsonl'")
    assert body["steps"]["optimizer_steps"] == 10  # 40 examples, 4 a step
    created = client.post(URL, json=payload)
    assert created.status_code == 201, created.text
    data = client.get(f"{URL}/{created.json()['job_id']}").json()["payload"]["data_config"]
    assert data["validation_data_path"] == validation_id
    assert data["data_split_config"] == {"train": 1.0, "validation": 0.0}


def test_with_a_validation_dataset_the_train_fraction_still_applies_to_data_path(
    client: TestClient, hub: list[str]
) -> None:
    payload = with_validation(uploaded(client, ALPACA_ROWS), uploaded(client, HELD_OUT_ROWS),
                              prompt_template=QA_TEMPLATE, data_split_config={"train": 0.5})

    dataset = report(client.post(DRY_RUN, json=payload))["dataset"]

    assert (dataset["train_rows"], dataset["validation_rows"]) == (20, 12)


@pytest.mark.parametrize("url", [URL, DRY_RUN])
def test_a_validation_fraction_beside_a_validation_dataset_is_refused_naming_the_split(
    client: TestClient, hub: list[str], url: str
) -> None:
    payload = with_validation(uploaded(client, ALPACA_ROWS), uploaded(client, HELD_OUT_ROWS),
                              prompt_template=QA_TEMPLATE,
                              data_split_config={"train": 0.8, "validation": 0.2})

    fields = refused(client.post(url, json=payload))

    assert set(fields) == {"data_config.data_split_config"}
    assert fields["data_config.data_split_config"].startswith(
        "validation 0.2 asks for a split of data_path, but validation_data_path names the "
        "validation set")
    assert jobs_stored() == []


@pytest.mark.parametrize("url", [URL, DRY_RUN])
@pytest.mark.parametrize(("value", "said"), [
    ("ds_" + "0" * 32, "no dataset with id ds_" + "0" * 32 + "; GET /v1/datasets lists yours"),
    ("ds_nope", "no dataset with id ds_nope: uploaded dataset ids are 'ds_' and 32 hex digits"),
    ("tatsu-lab/alpaca", "'tatsu-lab/alpaca' is not an uploaded dataset id ('ds_…')"),
    ("https://example.com/val.jsonl", "is not an uploaded dataset id ('ds_…')"),
])
def test_a_validation_data_path_that_is_no_dataset_of_yours_is_refused_naming_it(
    client: TestClient, hub: list[str], url: str, value: str, said: str
) -> None:
    payload = with_validation(uploaded(client, ALPACA_ROWS), value, prompt_template=QA_TEMPLATE)

    fields = refused(client.post(url, json=payload))

    assert set(fields) == {"data_config.validation_data_path"}
    assert said in fields["data_config.validation_data_path"]
    assert jobs_stored() == []


def test_another_tenants_dataset_as_validation_is_no_dataset_at_all(
    client: TestClient, hub: list[str]
) -> None:
    theirs = upload_ok(client, "jsonl", HELD_OUT_ROWS)["id"]
    client.headers["Authorization"] = f"Bearer {new_key('tenant-b')}"
    payload = with_validation(uploaded(client, ALPACA_ROWS), theirs,
                              prompt_template=QA_TEMPLATE)

    fields = refused(client.post(URL, json=payload))

    assert fields == {"data_config.validation_data_path":
                      f"no dataset with id {theirs}; GET /v1/datasets lists yours"}


def test_a_validation_dataset_not_uploaded_yet_is_refused_saying_so(
    client: TestClient, hub: list[str]
) -> None:
    pending = client.get("/v1/upload", params={"filename": "val.jsonl"}).json()["dataset_id"]
    payload = with_validation(uploaded(client, ALPACA_ROWS), pending,
                              prompt_template=QA_TEMPLATE)

    fields = refused(client.post(URL, json=payload))

    assert "has not been uploaded yet" in fields["data_config.validation_data_path"]


@pytest.mark.parametrize("url", [URL, DRY_RUN])
@pytest.mark.parametrize(("train_rows", "validation_rows", "data", "training", "said"), [
    (ALPACA_ROWS, CHAT_ROWS[:12], {"prompt_template": QA_TEMPLATE}, {},
     "the validation dataset: prompt_template uses columns the dataset does not have: "
     "['instruction', 'output']"),
    (CHAT_ROWS, HELD_OUT_ROWS, {"prompt_template": "{messages}"}, {},
     "the validation dataset: prompt_template uses columns the dataset does not have: "
     "['messages']"),
    (PREFERENCE_ROWS, HELD_OUT_ROWS, {}, {"preference_optimization": "DPO"},
     "the validation dataset: DPO needs the columns ['prompt', 'chosen', 'rejected']"),
])
def test_a_validation_dataset_without_the_columns_the_job_reads_is_refused_naming_it(
    client: TestClient, hub: list[str], url: str, train_rows: list[dict[str, Any]],
    validation_rows: list[dict[str, Any]], data: dict[str, Any], training: dict[str, Any],
    said: str,
) -> None:
    payload = with_validation(uploaded(client, train_rows), uploaded(client, validation_rows),
                              **data)
    payload["training_config"].update(training)

    fields = refused(client.post(url, json=payload))

    assert set(fields) == {"data_config.validation_data_path"}
    assert fields["data_config.validation_data_path"].startswith(said)
    assert jobs_stored() == []


def test_a_preference_validation_dataset_in_openais_format_passes_beside_plain_columns(
    client: TestClient, hub: list[str]
) -> None:
    openai_rows = [{"input": {"messages": [{"role": "user", "content": f"What is {i}?"}]},
                    "preferred_output": [{"role": "assistant", "content": f"{i}"}],
                    "non_preferred_output": [{"role": "assistant", "content": "No."}]}
                   for i in range(6)]
    payload = with_validation(uploaded(client, PREFERENCE_ROWS), uploaded(client, openai_rows))
    payload["training_config"]["preference_optimization"] = "ORPO"

    assert report(client.post(DRY_RUN, json=payload))["dataset"]["validation_rows"] == 6


def test_data_path_as_its_own_validation_dataset_is_a_warning(
    client: TestClient, hub: list[str]
) -> None:
    dataset_id = uploaded(client, ALPACA_ROWS)
    payload = with_validation(dataset_id, dataset_id, prompt_template=QA_TEMPLATE)

    body = report(client.post(DRY_RUN, json=payload))

    assert any(w.startswith("data_config.validation_data_path is data_path: the job evaluates "
                            "on rows it trains on") for w in body["warnings"])
