"""A job on two devices through the real stack: the API, a worker that owns two (CPU)
devices, torchrun with two gloo ranks, and the same logs, cancel and adapter as on one."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import (
    assert_adapter_changes_the_model,
    create_key,
    download_artifacts,
    stack_env,
    tiny_payload,
    wait_for_terminal,
)
from tests.worker.test_device_group import rank_processes

TWO_DEVICES = json.dumps([{"name": "train", "devices": 2, "memory_gb": None}])


def two_device_stack(tmp_path: Path, tiny_model_dir: Path,
                     start_stack: Callable[..., LocalStack], **env: str) -> tuple[LocalStack, str]:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_WORKER_DEVICES="2", TUNERY_DEVICE_CLASSES=TWO_DEVICES,
                    TUNERY_WORK_DIR=str(tmp_path / "work"), **env)
    return start_stack(env), create_key(env)


def test_a_two_device_job_completes_with_an_adapter_and_the_group_in_its_log(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    stack, key = two_device_stack(tmp_path, tiny_model_dir, start_stack)
    payload = tiny_payload(tiny_model_dir, devices=2, micro_batch_size=2)
    with httpx.Client(base_url=stack.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        submitted = client.post("/v1/finetune/llm", json=payload)
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]
        job = wait_for_terminal(client, job_id)
        assert job["status"] == "COMPLETED", job
        logs = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 500}).json()
        assert "process group: 2 ranks, DDP over gloo" in "\n".join(logs["logs"])
        assert any("| loss " in line for line in logs["logs"])
        names = download_artifacts(client, job_id, tmp_path / "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(names)
    assert_adapter_changes_the_model(tiny_model_dir, tmp_path / "adapter")


def test_cancel_through_the_api_stops_both_ranks(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    stack, key = two_device_stack(tmp_path, tiny_model_dir, start_stack)
    payload = tiny_payload(tiny_model_dir, devices=2, micro_batch_size=1, num_train_epochs=3)
    with httpx.Client(base_url=stack.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        job_id = client.post("/v1/finetune/llm", json=payload).json()["job_id"]
        deadline = time.monotonic() + 240
        while not client.get(f"/v1/finetune/llm/{job_id}/metrics").json().get("metrics"):
            assert time.monotonic() < deadline, "the job never trained a step"
            time.sleep(0.5)
        assert client.post(f"/v1/finetune/llm/{job_id}/cancel").status_code == 200
        job = wait_for_terminal(client, job_id, timeout_s=120)
    assert job["status"] == "CANCELLED"
    assert not any(rank_processes(group.parent) for group in (tmp_path / "work").glob("*/group"))


def test_a_rank_killed_mid_run_loses_the_attempt_and_the_retry_resumes_to_the_same_steps(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    stack, key = two_device_stack(tmp_path, tiny_model_dir, start_stack,
                                  TUNERY_CHECKPOINT_EVERY_STEPS="2")
    payload = tiny_payload(tiny_model_dir, devices=2, micro_batch_size=1, num_train_epochs=1)
    with httpx.Client(base_url=stack.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        job_id = client.post("/v1/finetune/llm", json=payload).json()["job_id"]
        metrics_url = f"/v1/finetune/llm/{job_id}/metrics"
        deadline = time.monotonic() + 240
        while max((m["step"] for m in client.get(metrics_url).json()["metrics"]), default=0) < 4:
            assert time.monotonic() < deadline, "the job never reached step 4"
            time.sleep(0.3)
        groups = list((tmp_path / "work").glob("*/group"))
        os.kill(rank_processes(groups[0].parent)[1], signal.SIGKILL)
        job = wait_for_terminal(client, job_id, timeout_s=300)
        metrics = client.get(metrics_url).json()["metrics"]
        logs = "\n".join(client.get(f"/v1/finetune/llm/{job_id}/logs",
                                     params={"n_lines": 1000}).json()["logs"])
    assert job["status"] == "COMPLETED", job
    planned = int(next(m["values"]["total_steps"] for m in metrics
                       if "total_steps" in m["values"]))
    assert job["result"]["steps"] == planned
    assert "process group of 2 exited" in logs or "a rank crashed" in logs
    assert "attempt 2 started" in logs and "resuming at step" in logs
