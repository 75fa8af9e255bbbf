"""The base model cache in a real worker process, on the embedded stack `tunery up` runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file

from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import (
    create_key,
    download_artifacts,
    stack_env,
    tiny_payload,
    wait_for_terminal,
)


def test_a_second_job_on_one_worker_reuses_the_base_and_trains_the_same_adapter(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir])
    stack = start_stack(env)
    key = create_key(env)
    adapters, base_lines = [], []
    with httpx.Client(
        base_url=stack.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        for n in range(2):
            payload = tiny_payload(tiny_model_dir, num_train_epochs=0.1)
            job_id = client.post("/v1/finetune/llm", json=payload).json()["job_id"]
            job = wait_for_terminal(client, job_id)
            assert job["status"] == "COMPLETED", job
            logs = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 500})
            base_lines.append([line for line in logs.json()["logs"] if "cache" in line])
            download_artifacts(client, job_id, tmp_path / f"adapter-{n}")
            adapters.append(load_file(tmp_path / f"adapter-{n}" / "adapter_model.safetensors"))
    assert any("loaded into this worker's cache" in line for line in base_lines[0]), base_lines
    assert any("reused from this worker's cache" in line for line in base_lines[1]), base_lines
    first, second = adapters
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
