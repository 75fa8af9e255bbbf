"""End-to-end fixtures: real API and Celery worker processes, a tiny model built offline."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.local_stack import LocalStack
from cli.process_commands import tunery_command
from tests.conftest import ASSETS_DIR, make_payload

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}


def stack_env(data_dir: Path, allowed: list[Path], **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    env.update(
        {
            "TUNERY_DATA_DIR": str(data_dir),
            "TUNERY_ALLOWED_LOCAL_DIRS": json.dumps([str(p) for p in allowed]),
            "TUNERY_LEASE_SECONDS": "60",
        }
    )
    env.update(overrides)
    return env


@pytest.fixture
def start_stack(tmp_path: Path) -> Iterator[Callable[..., LocalStack]]:
    stacks: list[LocalStack] = []

    def start(env: dict[str, str], **options: Any) -> LocalStack:
        stack = LocalStack(env=env, log_dir=tmp_path / "logs", **options)
        stacks.append(stack)
        return stack.__enter__()

    yield start
    for stack in stacks:
        stack.stop()
    for log in sorted((tmp_path / "logs").glob("*.log")):
        # Shown only when a test fails: pytest prints captured output for failures.
        print(f"===== {log.name} =====\n{log.read_text(errors='replace')[-6000:]}")


def create_key(env: dict[str, str], name: str = "e2e", admin: bool = False) -> str:
    import subprocess

    out = subprocess.run(
        tunery_command("keys", "create", "--name", name, "--quiet",
                       *(["--admin"] if admin else [])),
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def tiny_payload(model_dir: Path, **training: Any) -> dict[str, Any]:
    return make_payload(
        model_path=str(model_dir),
        data_config={"cutoff_len": 128},
        # A third of an epoch: about 23 optimizer steps, enough for the loss to fall visibly.
        training_config={
            "num_train_epochs": 0.34,
            "learning_rate": 0.005,
            "warmup_steps": 2,
            "lr_scheduler_type": "linear",
            **training,
        },
    )


def wait_for_terminal(client: httpx.Client, job_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/finetune/llm/{job_id}").json()
        if body["status"] in TERMINAL:
            return body
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {body['status']} after {timeout_s}s")


def download_artifacts(client: httpx.Client, job_id: str, dest: Path) -> list[str]:
    listing = client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()["artifacts"]
    dest.mkdir(parents=True, exist_ok=True)
    for artifact in listing:
        url = artifact["download_url"]
        # Presigned S3 URLs are absolute and carry their own auth; API routes need the key.
        response = httpx.get(url, timeout=60) if url.startswith("http") else client.get(url)
        response.raise_for_status()
        (dest / artifact["name"]).parent.mkdir(parents=True, exist_ok=True)
        (dest / artifact["name"]).write_bytes(response.content)
        assert len(response.content) == artifact["size"]
    return [a["name"] for a in listing]


def assert_adapter_changes_the_model(model_dir: Path, adapter_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    inputs = tokenizer(
        "### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n", return_tensors="pt"
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        base_tokens = base.generate(**inputs, max_new_tokens=8, do_sample=False)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    with torch.no_grad():
        tuned_logits = tuned(**inputs).logits
        tuned_tokens = tuned.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    assert not torch.equal(base_tokens, tuned_tokens)


def assert_loss_went_down(client: httpx.Client, job_id: str) -> None:
    metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
    losses = [m["values"]["loss"] for m in metrics if "loss" in m["values"]]
    assert len(losses) >= 4, metrics
    head, tail = losses[: len(losses) // 4], losses[-(len(losses) // 4) :]
    assert sum(tail) / len(tail) < sum(head) / len(head)


__all__ = ["ASSETS_DIR"]
