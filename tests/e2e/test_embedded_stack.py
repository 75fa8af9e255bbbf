"""One machine, no servers: SQLite, the SQLite broker and local storage, real processes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import (
    assert_adapter_changes_the_model,
    assert_loss_went_down,
    create_key,
    download_artifacts,
    stack_env,
    tiny_payload,
    wait_for_terminal,
)


def test_job_goes_from_post_to_downloaded_adapter_on_the_embedded_stack(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir])
    stack = start_stack(env)
    key = create_key(env)
    with httpx.Client(
        base_url=stack.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        submitted = client.post("/v1/finetune/llm", json=tiny_payload(tiny_model_dir))
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]
        job = wait_for_terminal(client, job_id)
        assert job["status"] == "COMPLETED", job
        assert job["result"]["steps"] > 0
        logs = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 500}).json()
        assert any("loss" in line for line in logs["logs"])
        names = download_artifacts(client, job_id, tmp_path / "adapter")
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(names)
        assert_loss_went_down(client, job_id)
    assert_adapter_changes_the_model(tiny_model_dir, tmp_path / "adapter")


def test_a_job_whose_data_lacks_a_column_fails_with_a_readable_reason(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir])
    stack = start_stack(env)
    key = create_key(env)
    payload = tiny_payload(tiny_model_dir)
    payload["data_config"]["prompt_template"] = "Q: {question}\nA: {output}"
    with httpx.Client(
        base_url=stack.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        job_id = client.post("/v1/finetune/llm", json=payload).json()["job_id"]
        job = wait_for_terminal(client, job_id)
    assert job["status"] == "FAILED"
    assert "question" in job["error"] and "instruction" in job["error"]
