"""The official `openai` package (pinned in pyproject; 3.x, whose transport is httpx2),
unchanged, against real API and worker processes: a team's fine-tuning code moved to Tunery by
changing `base_url` and the key."""

from __future__ import annotations

import base64
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from openai.types.fine_tuning import FineTuningJob

from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import create_key, stack_env

DONE = {"succeeded", "failed", "cancelled"}


def chat_file(path: Path, n: int) -> Path:
    """Conversations whose assistant answers in one recognisable style."""
    lines = [json.dumps({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Say the number {i}."},
        {"role": "assistant", "content": f"NUMBER {i} !!"},
    ]}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(client: OpenAI, job_id: str, until: Callable[[FineTuningJob], bool],
             timeout_s: float = 300) -> FineTuningJob:
    deadline = time.monotonic() + timeout_s
    job = client.fine_tuning.jobs.retrieve(job_id)
    while not until(job):
        assert time.monotonic() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.3)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


@pytest.fixture
def stack(tmp_path: Path, tiny_model_dir: Path,
          start_stack: Callable[..., LocalStack]) -> tuple[LocalStack, dict[str, str]]:
    # The test polls several times a second, faster than the per-key rate limit allows.
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_CHECKPOINT_EVERY_STEPS="5", TUNERY_RATE_LIMIT_PER_MINUTE="0")
    return start_stack(env), env


def test_the_openai_client_trains_pages_pauses_resumes_and_downloads_unchanged(
        tmp_path: Path, tiny_model_dir: Path, stack: tuple[LocalStack, dict[str, str]]) -> None:
    local, env = stack
    key = create_key(env)
    client = OpenAI(api_key=key, base_url=f"{local.base_url}/v1", max_retries=0)

    uploaded = client.files.create(file=chat_file(tmp_path / "train.jsonl", 40).open("rb"),
                                   purpose="fine-tune")
    assert (uploaded.status, uploaded.purpose) == ("processed", "fine-tune")
    hyperparameters: dict[str, Any] = {"n_epochs": 12, "batch_size": 4,
                                       "learning_rate_multiplier": 10}
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=uploaded.id, suffix="terse", seed=11,
        metadata={"team": "e2e"},
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}})
    assert job.status == "queued" and job.seed == 11
    # Queued behind the first: one worker trains one job at a time.
    queued = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id)
    assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"

    # Pause once the job has trained a step: it saves a checkpoint and frees the worker.
    wait_for(client, job.id, lambda j: j.status == "running")
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_for(client, job.id, lambda j: j.status in ("paused", *DONE))
    assert paused.status == "paused", paused
    assert paused.hyperparameters.n_epochs == 12
    saved = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert saved, "pausing saves a checkpoint"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_for(client, job.id, lambda j: j.status in DONE)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{tiny_model_dir}:e2e:terse:{done.id[6:14]}"
    assert done.trained_tokens and done.trained_tokens > 0
    assert done.finished_at and done.result_files

    # Jobs, newest first, page by page with `after` until has_more is false.
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=1)]
    assert listed == [queued.id, job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "e2e"})] == [job.id]

    # Events, newest first, every page of two: the whole story once.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))
    assert len({e.id for e in events}) == len(events)
    story = [e.message for e in reversed(events) if e.type == "message"]
    for said in ("Validating training file: " + uploaded.id, "Fine-tuning job started",
                 "Fine-tuning job paused", f"New fine-tuned model created: {done.fine_tuned_model}",
                 "The job has successfully completed"):
        assert said in story, said
    steps = [e.data["step"] for e in reversed(events)
             if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert steps == sorted(set(steps)), "no step is trained twice across the pause"
    total = 40 * 12 // 4
    assert steps[-1] == total

    # Checkpoints with metrics, and an adapter to download (a Tunery extension field).
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].fine_tuned_model_checkpoint.endswith(
        f":ckpt-step-{checkpoints[0].step_number}")
    http = httpx.Client(base_url=local.base_url, headers={"Authorization": f"Bearer {key}"})
    extra: Any = checkpoints[0].model_extra
    archive = tmp_path / "ckpt.tar.gz"
    archive.write_bytes(http.get(extra["download_url"]).raise_for_status().content)
    with tarfile.open(archive) as tar:
        assert sorted(Path(n).name for n in tar.getnames()) == [
            "adapter_config.json", "adapter_model.safetensors"]

    # The result file, base64 as OpenAI serves it.
    csv_text = base64.b64decode(client.files.content(done.result_files[0]).read()).decode()
    header, *rows = csv_text.splitlines()
    assert header == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(rows) == total

    # The same job through the MonsterAPI dialect: its final adapter.
    tunery_id = done.model_extra["tunery_job_id"] if done.model_extra else ""
    artifacts = http.get(f"/v1/finetune/llm/{tunery_id}/artifacts").json()["artifacts"]
    assert "adapter_model.safetensors" in {a["name"] for a in artifacts}

    # Seven examples: the job fails as OpenAI's validation fails it.
    few = client.files.create(file=chat_file(tmp_path / "few.jsonl", 7).open("rb"),
                              purpose="fine-tune")
    failed = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=few.id)
    failed = wait_for(client, failed.id, lambda j: j.status in DONE)
    assert failed.status == "failed" and failed.error and failed.error.code == "invalid_n_examples"

    # Another tenant sees none of it, through every route.
    other = OpenAI(api_key=create_key(env, name="other-team"),
                   base_url=f"{local.base_url}/v1", max_retries=0)
    for attempt in (lambda: other.files.retrieve(uploaded.id),
                    lambda: other.files.content(uploaded.id),
                    lambda: other.files.delete(uploaded.id),
                    lambda: other.fine_tuning.jobs.retrieve(job.id),
                    lambda: other.fine_tuning.jobs.cancel(job.id),
                    lambda: other.fine_tuning.jobs.pause(job.id),
                    lambda: other.fine_tuning.jobs.resume(job.id),
                    lambda: list(other.fine_tuning.jobs.list_events(job.id)),
                    lambda: list(other.fine_tuning.jobs.checkpoints.list(job.id))):
        with pytest.raises(NotFoundError):
            attempt()
    assert list(other.fine_tuning.jobs.list()) == []
    with pytest.raises(BadRequestError) as refused:
        other.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id)
    assert refused.value.body and refused.value.body["param"] == "training_file"  # type: ignore[index]

    # A finished job cannot be cancelled: a 400 the client does not retry.
    with pytest.raises(BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_a_dpo_job_through_the_openai_client_trains_the_preferred_answers(
        tmp_path: Path, tiny_model_dir: Path, stack: tuple[LocalStack, dict[str, str]]) -> None:
    local, env = stack
    client = OpenAI(api_key=create_key(env), base_url=f"{local.base_url}/v1", max_retries=0)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"Say the number {i}."}]},
        "preferred_output": [{"role": "assistant", "content": f"NUMBER {i} !!"}],
        "non_preferred_output": [{"role": "assistant", "content": "no"}],
    }) + "\n" for i in range(16)))
    uploaded = client.files.create(file=pairs.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=uploaded.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {
            "beta": 0.2, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}}})
    done = wait_for(client, job.id, lambda j: j.status in DONE)
    assert done.status == "succeeded", done.error
    assert done.method and done.method.type == "dpo"
    assert done.method.dpo and done.method.dpo.hyperparameters
    assert done.method.dpo.hyperparameters.beta == 0.2
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
               if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert len(metrics) == 16 * 2 // 4
    # The same preference file given to a supervised job fails as OpenAI's validation does.
    wrong = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id)
    assert wrong.status == "failed" and wrong.error
    assert wrong.error.code == "invalid_training_file"


def test_a_validation_file_through_the_openai_client_reports_valid_loss(
        tmp_path: Path, tiny_model_dir: Path, stack: tuple[LocalStack, dict[str, str]]) -> None:
    local, env = stack
    client = OpenAI(api_key=create_key(env), base_url=f"{local.base_url}/v1", max_retries=0)
    training = client.files.create(file=chat_file(tmp_path / "train.jsonl", 16).open("rb"),
                                   purpose="fine-tune")
    validation = client.files.create(file=chat_file(tmp_path / "valid.jsonl", 4).open("rb"),
                                     purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=training.id, validation_file=validation.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10}}})
    assert job.validation_file == validation.id

    done = wait_for(client, job.id, lambda j: j.status in DONE)

    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    valid = [e.data for e in events if e.type == "metrics" and "valid_loss" in (e.data or {})]
    assert valid and all(d["valid_loss"] > 0 for d in valid)
    assert any("validation loss=" in e.message for e in events if e.type == "metrics")
    # Every training line trained: 16 lines in steps of 4.
    steps = {e.data["step"] for e in events
             if e.type == "metrics" and "train_loss" in (e.data or {})}
    assert max(steps) == 4
    csv_text = base64.b64decode(client.files.content(done.result_files[0]).read()).decode()
    _header, *rows = csv_text.splitlines()
    assert any(row.split(",")[3] for row in rows), "a valid_loss in the result file"
