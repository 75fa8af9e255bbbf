"""Exports through real API and worker processes on the embedded stack: a tiny job asks at
submit for a GGUF export, which fails with a readable reason (llama.cpp does not know the tiny
tokenizer) and leaves the job COMPLETED; a merged export asked for after the fact completes,
is downloaded through the artifacts routes and computes what base + adapter compute."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import (
    create_key,
    download_artifacts,
    stack_env,
    tiny_payload,
    wait_for_terminal,
)


def wait_for_exports(client: httpx.Client, job_id: str, count: int,
                     timeout_s: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = client.get(f"/v1/finetune/llm/{job_id}/exports").json()["exports"]
        if len(found) == count and all(e["status"] in ("COMPLETED", "FAILED") for e in found):
            return found
        time.sleep(0.5)
    raise TimeoutError(f"exports of job {job_id} not done after {timeout_s}s: {found}")


def test_a_tiny_job_exports_a_merged_model_after_the_fact_and_its_gguf_fails_readably(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # fp32 on every CPU, so that the merged logits can be held to fp32's tolerance.
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir], TUNERY_CPU_BF16="off")
    stack = start_stack(env)
    key = create_key(env)
    payload = tiny_payload(tiny_model_dir, exports_on_completion=[{"format": "gguf"}])
    with httpx.Client(
        base_url=stack.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        job_id = client.post("/v1/finetune/llm", json=payload).json()["job_id"]
        assert wait_for_terminal(client, job_id)["status"] == "COMPLETED"
        (gguf,) = wait_for_exports(client, job_id, 1)
        posted = client.post(f"/v1/finetune/llm/{job_id}/exports", json={"format": "merged"})
        assert posted.status_code == 202, posted.text
        exports = {e["format"]: e for e in wait_for_exports(client, job_id, 2)}
        job = client.get(f"/v1/finetune/llm/{job_id}").json()
        logs = client.get(f"/v1/finetune/llm/{job_id}/logs", params={"n_lines": 500}).json()
        names = download_artifacts(client, job_id, tmp_path / "download")
        archive = client.get(f"/v1/finetune/llm/{job_id}/artifacts/archive")

    assert gguf["status"] == "FAILED" and "BPE pre-tokenizer" in gguf["error"]
    assert job["status"] == "COMPLETED" and job["error"] is None
    assert "exports queued: gguf-f16" in logs["logs"]
    assert any(line.startswith("export gguf-f16: failed") for line in logs["logs"])
    merged = exports["merged"]
    assert merged["status"] == "COMPLETED", merged
    assert set(merged["artifacts"]) <= set(names)
    assert "exports/merged/model.safetensors" in merged["artifacts"]
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        assert not [m.name for m in tar.getmembers() if "/exports/" in m.name]

    merged_dir = tmp_path / "download" / "exports" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(["### Instruction: add 2 and 3", "### Input: the cat"],
                      return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(base, tmp_path / "download").eval()
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = tuned(**batch).logits, plain(**batch).logits
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "float32"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
