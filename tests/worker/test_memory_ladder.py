"""The memory ladder: an out-of-memory at step N hands the job back one rung lower, and the
job finishes with the steps, the effective batch and (within numerics) the loss of a run that
never ran out; out of memory on every rung fails the job naming the memory and the rungs; a
worker killed by SIGKILL moves the next attempt one rung down.

One process, the embedded database, the real heartbeat and training on the tiny model. A CPU
never raises CUDA's out-of-memory error, so the tests inject `torch.OutOfMemoryError`, with
torch's own message, at the start of an optimizer step from a Trainer callback added to the
pipeline's `TrainingWatch`: the one edge mocked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from transformers import TrainerCallback

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobLog, JobMetric, JobStatus
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from worker import memory_ladder
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline import callbacks
from worker.tasks import run_claimed_job

# 24 examples, 4 a micro-batch, 2 epochs: 12 optimizer steps, a checkpoint every 2.
TRAINING = {"num_train_epochs": 2, "micro_batch_size": 4, "gradient_accumulation_steps": 1}
OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
               "79.10 GiB of which 1.25 GiB is free. (injected by the test)")


class OutOfMemoryAt(TrainerCallback):
    """Raises torch's out-of-memory error as optimizer step `step` begins, on every attempt
    (`every_rung`) or on the first only."""

    raised = 0

    def __init__(self, step: int, every_rung: bool) -> None:
        self.step, self.every_rung = step, every_rung

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.step and (self.every_rung or not OutOfMemoryAt.raised):
            OutOfMemoryAt.raised += 1
            raise torch.OutOfMemoryError(OOM_MESSAGE)


def inject_out_of_memory(monkeypatch: pytest.MonkeyPatch, step: int, *, every_rung: bool) -> None:
    monkeypatch.setattr(OutOfMemoryAt, "raised", 0)
    real_init = callbacks.TrainingWatch.__init__

    def init(self: callbacks.TrainingWatch, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self.callbacks.append(OutOfMemoryAt(step, every_rung))

    monkeypatch.setattr(callbacks.TrainingWatch, "__init__", init)


@pytest.fixture
def stack(tunery_env: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(
        "TUNERY_ALLOWED_LOCAL_DIRS", f'["{DATASET_PATH.parent}", "{tiny_model_dir.parent}"]'
    )
    monkeypatch.setenv("TUNERY_HEARTBEAT_SECONDS", "0.2")
    monkeypatch.setenv("TUNERY_CHECKPOINT_EVERY_STEPS", "2")
    get_settings.cache_clear()
    upgrade_database(get_settings().database.url)
    with session_scope() as session:
        return create_api_key(session, "ladder").tenant_id


def submit(tenant: str, request: FinetuneRequest) -> str:
    with session_scope() as session:
        return jobs.create_job(session, tenant, request, max_attempts=3, device_class="train").id


def claim(job_id: str) -> Claim | None:
    with session_scope() as session:
        return jobs.claim_job(session, job_id, "w", get_settings().leases.lease_seconds)


def run_to_the_end(job_id: str, request: FinetuneRequest) -> Job:
    """Claim and run attempts until the job is neither QUEUED nor handed back."""
    while (claimed := claim(job_id)) is not None:
        run_claimed_job(claimed, request)
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
    return job


def log_lines(job_id: str) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(JobLog.line).where(JobLog.job_id == job_id)
                                    .order_by(JobLog.id)).all())


def step_losses(job_id: str) -> dict[int, float]:
    """The training loss of each optimizer step, the last attempt's where steps repeat."""
    with session_scope() as session:
        rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)
                               .order_by(JobMetric.id)).all()
        return {row.step: row.values["loss"] for row in rows if "loss" in row.values}


def effective_batches(lines: list[str]) -> list[int]:
    """micro-batch x accumulation of every training run in the log (`MetricsCallback`'s
    "training N steps: ..., batch B x A" line), divided by the slices a rung cuts each into."""
    found = []
    for line in lines:
        if match := re.search(r"batch (\d+) x (\d+), optimizer", line):
            found.append(int(match[1]) * int(match[2]))
    return found


def test_the_ladder_keeps_the_effective_batch_and_ends_with_checkpointing(
    make_request: Any,
) -> None:
    for size, accumulation in [(4, 1), (6, 2), (5, 3), (1, 4), (64, 1)]:
        request = make_request(training={"micro_batch_size": size,
                                         "gradient_accumulation_steps": accumulation})
        rungs = memory_ladder.ladder(request)
        assert rungs[0] == memory_ladder.Rung(size, accumulation, False, 1)
        assert {r.micro_batch_size * r.gradient_accumulation_steps for r in rungs} == {
            size * accumulation}
        assert [r.micro_batch_size for r in rungs[:-1]] == sorted(
            {r.micro_batch_size for r in rungs[:-1]}, reverse=True)
        assert rungs[-1].gradient_checkpointing and rungs[-1].micro_batch_size == 1
        assert not any(r.gradient_checkpointing for r in rungs[:-1])
    assert [r.micro_batch_size for r in memory_ladder.ladder(
        make_request(training={"micro_batch_size": 6}))] == [6, 3, 1, 1]


def test_an_out_of_memory_at_step_n_resumes_one_rung_lower_and_trains_the_same_steps(
    stack: str, make_request: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = make_request(training=TRAINING, model={"lora_dropout": 0.0})
    uninterrupted = run_to_the_end(submit(stack, request), request)

    inject_out_of_memory(monkeypatch, step=5, every_rung=False)
    job_id = submit(stack, request)
    first = claim(job_id)
    assert first is not None
    handed_back = run_claimed_job(first, request)

    assert handed_back and OutOfMemoryAt.raised == 1
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.QUEUED.value and job.memory_rung == 1
        # Not a lost attempt: the ladder bounds the retries.
        assert job.max_attempts == 4 and job.error is None
    recovered = run_to_the_end(job_id, request)
    lines = log_lines(job_id)

    assert recovered.status == JobStatus.COMPLETED.value, recovered.error
    assert uninterrupted.result is not None and recovered.result is not None
    assert recovered.result["steps"] == uninterrupted.result["steps"] == 12
    assert any(line.startswith("memory ladder: out of memory, the step tried to allocate "
                               "2.00 GiB") and "next: rung 1 (micro-batch 2 x gradient "
                               "accumulation 2)" in line for line in lines), lines
    assert "memory ladder: micro-batch 2 x gradient accumulation 2" in lines
    assert any(line.startswith("resumed from step 4 (attempt ") for line in lines), lines
    # The Trainer batches as asked on every attempt; the rung slices each batch in two.
    assert effective_batches(lines) == [4, 4]
    assert effective_batches(log_lines(uninterrupted.id)) == [4]
    losses, expected = step_losses(job_id), step_losses(uninterrupted.id)
    print("step losses, uninterrupted vs out of memory at step 5, resumed from step 4 on "
          "rung 1:", {step: (round(expected[step], 6), round(losses[step], 6))
                      for step in sorted(expected)})
    assert sorted(losses) == sorted(expected) == list(range(1, 13))
    # The same examples in each step, the same optimizer state: the first step on the lower
    # rung has the loss of the uninterrupted run's step 5 but for float rounding (two slices
    # summed instead of one batch), which the later steps carry on.
    assert losses[5] == pytest.approx(expected[5], abs=1e-5)
    loss, final = recovered.result["last_loss"], uninterrupted.result["last_loss"]
    print(f"final loss: uninterrupted {final:.6f}, recovered {loss:.6f}")
    assert loss == pytest.approx(final, rel=0.02)


def test_out_of_memory_on_every_rung_fails_the_job_naming_the_memory_and_the_rungs(
    stack: str, make_request: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = make_request(training=TRAINING)
    inject_out_of_memory(monkeypatch, step=3, every_rung=True)
    job_id = submit(stack, request)

    job = run_to_the_end(job_id, request)

    rungs = memory_ladder.ladder(request)
    assert len(rungs) == 4 and OutOfMemoryAt.raised == len(rungs)
    assert job.status == JobStatus.FAILED.value
    assert job.error_code == "out_of_memory"
    assert job.error is not None and "internal error" not in job.error
    assert job.error.startswith("out of memory on every rung of the memory ladder (out of "
                                "memory, the step tried to allocate 2.00 GiB, capacity 79.10 "
                                "GiB)"), job.error
    for index, rung in enumerate(rungs):
        assert f"rung {index}: {rung.describe()}" in job.error
    lines = log_lines(job_id)
    steps_down = [line for line in lines if line.startswith("memory ladder: out of memory")]
    assert [re.search(r"next: rung (\d)", line)[1] for line in steps_down] == ["1", "2", "3"]
    assert lines[-1] == f"failed: {job.error}"


def test_a_worker_killed_by_sigkill_moves_the_next_attempt_one_rung_down(
    stack: str, make_request: Any,
) -> None:
    request = make_request(training=TRAINING)
    job_id = submit(stack, request)
    first = claim(job_id)
    assert first is not None
    # What `tunery up` records when the kernel's OOM killer ends a worker.
    with session_scope() as session:
        assert jobs.transition(session, job_id, JobStatus.QUEUED, attempt=first.attempt,
                               reason="worker pid 123 exited by SIGKILL")
    second = claim(job_id)
    assert second is not None
    said: list[str] = []

    step = memory_ladder.starting_rung(second, request, said.append)

    assert step.rung == 1
    assert said == ["memory ladder: attempt 1's worker was killed (worker pid 123 exited by "
                    "SIGKILL), most likely by the kernel's out-of-memory killer, capacity "
                    f"{memory_ladder._host_memory()} on rung 0 (micro-batch 4 x gradient "
                    "accumulation 1); next: rung 1 (micro-batch 2 x gradient accumulation 2); "
                    "resuming from the last checkpoint"]
    with session_scope() as session:
        assert session.get_one(Job, job_id).memory_rung == 1
    # A death for another reason moves nothing: attempt 2's lease merely expired.
    with session_scope() as session:
        assert jobs.transition(session, job_id, JobStatus.QUEUED, attempt=second.attempt,
                               reason="lease of attempt 2 expired (worker w lost); re-queued")
    third = claim(job_id)
    assert third is not None
    assert memory_ladder.starting_rung(third, request, said.append).rung == 1
    assert said[-1].startswith("memory ladder: rung 1 of 3: micro-batch 2")
