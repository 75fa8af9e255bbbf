"""kill -9 of a worker in the middle of a DPO job: the next attempt resumes from the job's
checkpoint and ends with the adapter an uninterrupted run of the same job trains."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.chaos.chaos_report import ScenarioReport
from tests.chaos.expectations import ADAPTER, assert_completed_once
from tests.chaos.job_records import JobTrace
from tests.chaos.stack import ChaosStack
from tests.conftest import make_payload
from worker.assets.build_dataset import DATASET_PATH

# Past several of the checkpoints taken every 2 steps, in the first of two epochs of 19.
KILL_AT_STEP = 11
# A resumed run replays the same batches with the same optimizer and RNG state: the same
# kernels on the same machine give the same numbers (as tests/worker/test_dpo.py measures).
RESUME_ATOL = 1e-6
REJECTED = "Well, I am not entirely sure, but it is probably something else, let me think."


def openai_preference_rows(n: int) -> bytes:
    """`n` alpaca sample rows in OpenAI's preference format: the sample's answer preferred
    over a wordy non-answer."""
    lines = []
    for line in DATASET_PATH.read_text().splitlines()[:n]:
        row = json.loads(line)
        question = f"{row['instruction']} {row['input']}".strip()
        lines.append(json.dumps({
            "input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": row["output"]}],
            "non_preferred_output": [{"role": "assistant", "content": REJECTED}],
        }))
    return ("\n".join(lines) + "\n").encode()


def dpo_payload(stack: ChaosStack, dataset_id: str) -> dict[str, object]:
    """160 pairs, 152 to train on: micro-batches of 4, 2 to a step, 19 steps an epoch."""
    return make_payload(
        model_path=str(stack.model_dir),
        data_config={"data_path": dataset_id, "cutoff_len": 64,
                     "data_split_config": {"train": 0.95, "validation": 0.05}},
        training_config={
            "preference_optimization": "DPO", "beta": 0.2, "num_train_epochs": 2,
            "micro_batch_size": 4, "gradient_accumulation_steps": 2,
            "early_stopping_patience": 1000, "learning_rate": 0.005, "warmup_steps": 2,
            "lr_scheduler_type": "linear",
        },
    )


def losses(trace: JobTrace, attempt: int) -> dict[int, float]:
    return {m.step: float(m.values["loss"]) for m in trace.training_metrics(attempt)}


def test_dpo_job_whose_worker_is_killed_resumes_and_trains_the_uninterrupted_adapter(
    chaos_stack: ChaosStack, scenario_report: ScenarioReport
) -> None:
    stack = chaos_stack
    stack.start_api()
    first = stack.start_worker()
    with stack.client() as client:
        uploaded = client.post("/v1/datasets", files={
            "file": ("preferences.jsonl", openai_preference_rows(160), "application/x-ndjson")})
        assert uploaded.status_code == 201, uploaded.text
        payload = dpo_payload(stack, uploaded.json()["id"])
        submitted = client.post("/v1/finetune/llm", json=payload)
        assert submitted.status_code == 201, submitted.text
        killed_job = str(submitted.json()["job_id"])
    scenario_report.submitted(killed_job)

    def past_a_checkpoint(trace: JobTrace) -> bool:
        steps = trace.trained_steps(trace.attempt)
        return (trace.status == "RUNNING" and bool(trace.checkpoints_saved(trace.attempt))
                and bool(steps) and max(steps) >= KILL_AT_STEP)

    stack.wait_for(killed_job, f"step {KILL_AT_STEP} after a checkpoint", past_a_checkpoint,
                   timeout_s=120, interval_s=0.05)
    scenario_report.fault("kill -9 the worker mid-epoch of a DPO job", [killed_job])
    first.kill()
    stack.start_worker()
    killed = stack.wait_terminal(killed_job, timeout_s=120)
    assert_completed_once(stack, killed)

    with stack.client() as client:
        again = client.post("/v1/finetune/llm", json=payload)
        assert again.status_code == 201, again.text
        uninterrupted_job = str(again.json()["job_id"])
    uninterrupted = stack.wait_terminal(uninterrupted_job, timeout_s=120)
    assert_completed_once(stack, uninterrupted)
    scenario_report.write(stack.db)

    detail = stack.describe(killed_job)
    assert killed.attempt == 2 and uninterrupted.attempt == 1, detail
    resumed = killed.resumed_from(2)
    assert resumed is not None and resumed >= 2, detail
    assert killed.trained_steps(2)[0] == resumed + 1, detail
    assert killed.planned_steps() == uninterrupted.planned_steps() == 38
    # Every step the second attempt trained is the uninterrupted run's step.
    reference = losses(uninterrupted, 1)
    for step, loss in losses(killed, 2).items():
        assert abs(loss - reference[step]) <= RESUME_ATOL, (step, loss, reference[step])
    adapter = load_file(stack.storage_dir / "jobs" / killed_job / ADAPTER)
    expected = load_file(stack.storage_dir / "jobs" / uninterrupted_job / ADAPTER)
    assert adapter.keys() == expected.keys()
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, expected[name], atol=RESUME_ATOL, rtol=0)
