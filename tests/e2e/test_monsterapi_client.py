"""The official `monsterapi` client from PyPI, unchanged, against a running Tunery."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from monsterapi import client as monsterapi_client
from openai import APIStatusError, OpenAI

from cli.local_stack import LocalStack, free_port
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import create_key, stack_env, tiny_payload


def test_monsterapi_client_launches_follows_and_terminates_jobs(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir])
    stack = start_stack(env)
    client = monsterapi_client(api_key=create_key(env), base_url=f"{stack.base_url}/v1")

    launched = client.finetune(service="llm", params=tiny_payload(tiny_model_dir))
    deployment_id = launched["deployment_id"]
    # The worker runs one job at a time, so this one waits in the queue behind the first.
    second = client.finetune(service="llm", params=tiny_payload(tiny_model_dir))["deployment_id"]
    terminated = client.terminate_deployment(second)
    assert terminated["status"] == "CANCELLED"

    deadline = time.monotonic() + 300
    status = client.get_deployment_status(deployment_id)
    while status["status"] not in ("COMPLETED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_deployment_status(deployment_id)
    assert status["status"] == "COMPLETED", status
    logs = client.get_deployment_logs(deployment_id, n_lines=1000)["logs"]
    assert any("loss" in line for line in logs)
    listed = {d["deployment_id"]: d["status"] for d in client.get_list_of_deployments()["items"]}
    assert listed == {deployment_id: "COMPLETED", second: "CANCELLED"}


def test_monsterapi_client_deploys_a_completed_job_and_terminates_the_deployment(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_RATE_LIMIT_PER_MINUTE="0")
    stack = start_stack(env, inference=True, engine_port=free_port())
    deploy_and_chat(stack, create_key(stack.env), tiny_model_dir)


def deploy_and_chat(stack: LocalStack, key: str, tiny_model_dir: Path) -> None:
    client = monsterapi_client(api_key=key, base_url=f"{stack.base_url}/v1")
    job_id = client.finetune(service="llm", params=tiny_payload(
        tiny_model_dir, num_train_epochs=0.1))["deployment_id"]
    deadline = time.monotonic() + 300
    job = client.get_deployment_status(job_id)
    while job["status"] not in ("COMPLETED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = client.get_deployment_status(job_id)
    assert job["status"] == "COMPLETED", job

    # The README's QuickServe example, with the job as the adapter.
    launched = client.deploy("llm", {
        "basemodel_path": str(tiny_model_dir),
        "loramodel_path": job_id,
        "prompt_template": "{prompt}{completion}",
        "api_auth_token": "b6a97d3b-35d0-4720-a44c-59ee33dbc25b",
        "per_gpu_vram": 24,
        "gpu_count": 1,
        "deployment_name": "tiny-bot",
    })
    deployment_id = launched["deployment_id"]
    assert deployment_id.startswith("dep-")
    status = client.get_deployment_status(deployment_id)
    assert (status["status"], status["deployment_name"]) == ("live", "tiny-bot")
    assert status["URL"] == f"{stack.base_url}/v1/deployments/{deployment_id}"
    assert status["job_id"] == job_id
    logs = client.get_deployment_logs(deployment_id)["logs"]
    assert [line.split(":")[0] for line in logs] == ["created", "live"]

    # The URL is an OpenAI base URL: the real engine answers with the job's adapter, the same
    # greedy answer the job gives through /v1/chat/completions, under the name asked.
    question: list[Any] = [{"role": "user", "content": "What is 2 plus 3?"}]
    deployed = OpenAI(base_url=status["URL"], api_key=key, max_retries=0)
    answer = deployed.chat.completions.create(model="tiny-bot", messages=question,
                                              max_tokens=8, temperature=0)
    direct = OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    expected = direct.chat.completions.create(model=job_id, messages=question, max_tokens=8,
                                              temperature=0)
    assert answer.model == "tiny-bot"
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert client.get_deployment_status(deployment_id)["requests_served"] == 1

    listed = client.get_list_of_deployments()
    assert [d["deployment_id"] for d in listed["deployments"]] == [deployment_id]
    assert [j["job_id"] for j in listed["items"]] == [job_id]

    assert client.terminate_deployment(deployment_id)["status"] == "TERMINATED"
    assert client.get_deployment_status(deployment_id)["status"] == "TERMINATED"
    assert client.get_deployment_logs(deployment_id)["logs"][-1].startswith("terminated:")
    with pytest.raises(APIStatusError) as gone:
        deployed.chat.completions.create(model="tiny-bot", messages=question, max_tokens=8)
    assert gone.value.status_code == 410
    # The job behind it is untouched.
    assert client.get_deployment_status(job_id)["status"] == "COMPLETED"
