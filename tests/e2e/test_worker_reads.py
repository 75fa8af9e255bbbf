"""What a tenant can make a real worker read, on the embedded stack `tunery up` runs: links
inside an allowed directory that lead to the server's own files fail the job, and the failure
names the link, never the target's path or content."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import httpx

from cli.local_stack import LocalStack
from tests.conftest import SAMPLE_DATASET
from tests.e2e.conftest import create_key, stack_env, tiny_payload, wait_for_terminal


def test_links_to_the_servers_files_fail_the_job_without_showing_it(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    allowed = tmp_path / "allowed"
    data_dir = allowed / "set"
    data_dir.mkdir(parents=True)
    shutil.copy(SAMPLE_DATASET, data_dir / "0.jsonl")
    model_dir = allowed / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    stack_data = tmp_path / "data"
    env = stack_env(stack_data, [allowed, tiny_model_dir, SAMPLE_DATASET.parent])
    stack = start_stack(env)
    key = create_key(env)
    # A file of the server's own, next to its database and storage in the data dir.
    secret = stack_data / "server-secret.txt"
    secret_text = "only-the-server-may-read-this"
    secret.write_text(secret_text + "\n")
    # Before, the data directory's job COMPLETED and its log showed the key as a column name.
    (data_dir / "a_k.csv").symlink_to(secret)
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer.json").symlink_to(secret)

    with httpx.Client(
        base_url=stack.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        cases = {
            f"{data_dir}/a_k.csv": tiny_payload(tiny_model_dir),
            f"{model_dir}/tokenizer.json": tiny_payload(model_dir),
        }
        cases[f"{data_dir}/a_k.csv"]["data_config"]["data_path"] = str(data_dir)
        for link, payload in cases.items():
            response = client.post("/v1/finetune/llm", json=payload)
            assert response.status_code == 201, response.text
            job_id = response.json()["job_id"]
            job = wait_for_terminal(client, job_id, timeout_s=120)
            logs = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 500})
            shown = job["error"] + "\n".join(logs.json()["logs"])

            assert job["status"] == "FAILED", job
            assert f"{link}' leads outside the directories this server allows" in job["error"]
            assert secret_text not in shown
            assert str(secret) not in shown and str(stack_data) not in shown

        # A packaged `datasets` builder name is no hub dataset: refused before it is queued.
        refused = client.post("/v1/finetune/llm", json={
            **tiny_payload(tiny_model_dir),
            "data_config": {"data_path": "text", "prompt_template": "{text}"},
        })
        assert refused.status_code == 422
        assert refused.json()["error"]["fields"][0]["path"] == "data_config.data_path"
