"""One job on a real pretrained model (SmolLM2-135M-Instruct) through the embedded stack."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from cli.demo import QUESTIONS, TEMPLATE, answers
from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR, make_payload
from tests.e2e.conftest import create_key, download_artifacts, stack_env, wait_for_terminal


def test_smollm2_learns_the_datasets_answer_style_through_the_service(
    tmp_path: Path, smollm2_dir: Path, start_stack: Callable[..., LocalStack]
) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, smollm2_dir])
    stack = start_stack(env)
    payload = make_payload(
        model_path=str(smollm2_dir),
        data_config={"prompt_template": TEMPLATE, "cutoff_len": 256},
        # About 14 optimizer steps: the house style ("Answer: X.") is learned by then.
        training_config={"num_train_epochs": 0.2, "learning_rate": 0.001, "warmup_steps": 2,
                         "lr_scheduler_type": "cosine"},
    )
    with httpx.Client(base_url=stack.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {create_key(env)}"}) as client:
        job_id = client.post("/v1/finetune/llm", json=payload).json()["job_id"]
        job = wait_for_terminal(client, job_id, timeout_s=600)
        assert job["status"] == "COMPLETED", job
        metrics = client.get(f"/v1/finetune/llm/{job_id}/metrics").json()["metrics"]
        download_artifacts(client, job_id, tmp_path / "adapter")
    eval_losses = [m["values"]["eval_loss"] for m in metrics if "eval_loss" in m["values"]]
    assert eval_losses[-1] < eval_losses[0]
    rows = answers(smollm2_dir, tmp_path / "adapter")
    assert len(rows) == len(QUESTIONS)
    base, tuned = [r[1] for r in rows], [r[2] for r in rows]
    assert base != tuned
    assert sum(t.startswith("Answer:") for t in tuned) > sum(b.startswith("Answer:") for b in base)
