"""The memory ladder: how a job that runs out of memory is tried again before it fails.

Rung 0 trains as the request asks. Each lower rung halves the micro-batch (down to 1, by
divisors of the request's) and multiplies gradient accumulation by as much, so that the
effective batch (micro-batch x accumulation x devices; one device per worker), the number of
optimizer steps and the learning-rate schedule stay those of the request; the last rung adds
gradient checkpointing at the smallest micro-batch. Below it the job fails with a reason that
names the memory the failing step needed and every rung tried.

Two ways down a rung:

- a CUDA out-of-memory error in the attempt (`torch.OutOfMemoryError`): the attempt hands the
  job back to the queue with the next rung set in the same transaction (`record_step`),
  without counting a lost attempt; the next attempt resumes from the last checkpoint. A fresh
  attempt rather than a retry in the process: it rebuilds the LoRA weights and the trainer as
  any resume does (an out-of-memory before the first checkpoint leaves weights the failed
  steps changed), its memory is that of a new job, and another worker may take it;
- the kernel's out-of-memory killer, which leaves no exception: `tunery up` records the
  worker's death as a job event ("worker pid 123 exited by SIGKILL"), and the next attempt
  moves one rung down before training (`starting_rung`).

The rung is the job's `memory_rung` column: an index into the ladder, which depends only on
the request, so every attempt of the job reads the same rungs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.models import Job, JobEvent, JobStatus
from shared.schema import FinetuneRequest, TrainingConfig
from shared.training_plan import micro_batch_size

log = logging.getLogger("tunery.worker")

# What a job event says when its worker was killed by SIGKILL, as `tunery up` records it; the
# kernel's out-of-memory killer sends SIGKILL, and so does little else on a worker host.
KILLED_BY_SIGKILL = re.compile(r"\bSIGKILL\b")
# torch's CUDA out-of-memory message: "Tried to allocate 2.00 GiB. GPU 0 has a total capacity
# of 79.10 GiB of which ..."
_TRIED = re.compile(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)")
_CAPACITY = re.compile(r"total capacity of ([0-9.]+ [KMGT]?i?B)")
ERROR_CODE = "out_of_memory"


@dataclass(frozen=True)
class Rung:
    """How one attempt trains: `micro_batch_size` examples per forward and backward,
    `gradient_accumulation_steps` of them per optimizer step."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    slices: int
    """Into how many slices each of the request's micro-batches is cut: the request's
    micro-batch size / this one's."""

    def describe(self) -> str:
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        return (f"micro-batch {self.micro_batch_size} x gradient accumulation "
                f"{self.gradient_accumulation_steps}{checkpointing}")

    def applied_to(self, config: TrainingConfig) -> TrainingConfig:
        """`config` with this rung's micro-batch and accumulation: for trainers that batch
        examples themselves (see `train.train`, `preference.train_preference`)."""
        return config.model_copy(update={
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        })


def ladder(request: FinetuneRequest) -> list[Rung]:
    """The rungs of `request`'s job, the request's own first."""
    config = request.training_config
    asked = micro_batch_size(config.micro_batch_size)
    checkpointing = request.pretrainedmodel_config.use_gradient_checkpointing
    rungs = [Rung(asked, config.gradient_accumulation_steps, checkpointing, 1)]
    size = asked
    while size > 1:
        size = size // 2 if size % 2 == 0 else 1
        rungs.append(Rung(size, config.gradient_accumulation_steps * (asked // size),
                          checkpointing, asked // size))
    if not checkpointing:
        last = rungs[-1]
        rungs.append(Rung(last.micro_batch_size, last.gradient_accumulation_steps, True,
                          last.slices))
    return rungs


def rung_of(request: FinetuneRequest, index: int) -> Rung:
    rungs = ladder(request)
    return rungs[min(max(index, 0), len(rungs) - 1)]


@dataclass(frozen=True)
class OutOfMemory:
    """What is known of the memory a failed attempt needed."""

    cause: str
    tried_to_allocate: str | None = None
    peak_bytes: int | None = None
    capacity: str | None = None

    def describe(self) -> str:
        parts = [self.cause]
        if self.tried_to_allocate:
            parts.append(f"the step tried to allocate {self.tried_to_allocate}")
        if self.peak_bytes is not None:
            parts.append(f"peak {_gib(self.peak_bytes)} allocated")
        parts.append(f"capacity {self.capacity}" if self.capacity else "capacity unknown")
        return ", ".join(parts)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch's out-of-memory error (CUDA, or another accelerator's)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def out_of_memory_figures(exc: BaseException) -> OutOfMemory:
    """What the failed allocation and the device say: the size torch's message names, the
    peak the allocator reached in this attempt, the device's capacity."""
    import torch

    message = str(exc)
    tried = _TRIED.search(message)
    capacity = _CAPACITY.search(message)
    peak: int | None = None
    if torch.cuda.is_available():
        peak = int(torch.cuda.max_memory_allocated())
        if capacity is None:
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            return OutOfMemory("out of memory", tried[1] if tried else None, peak, _gib(total))
    return OutOfMemory("out of memory", tried[1] if tried else None, peak,
                       capacity[1] if capacity else None)


def reset_peak_memory() -> None:
    """Count the peak from this attempt's start: an earlier job's peak is not this one's."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def failure_reason(request: FinetuneRequest, memory: OutOfMemory) -> str:
    """Why the job failed on its ladder's last rung: what it needed and what was tried."""
    tried = "; ".join(f"rung {i}: {rung.describe()}" for i, rung in enumerate(ladder(request)))
    return (f"out of memory on every rung of the memory ladder ({memory.describe()}); tried "
            f"{tried}. Use a smaller cutoff_len, a smaller model, QLoRA "
            f"(use_quantization) or a worker with more memory")


@dataclass(frozen=True)
class NextStep:
    """What the ladder decided after an out-of-memory: the rung the job goes on, or None
    when there is none left and the job fails with `reason`."""

    rung: int | None
    reason: str


def next_step(request: FinetuneRequest, current: int, memory: OutOfMemory) -> NextStep:
    rungs = ladder(request)
    if current + 1 < len(rungs):
        return NextStep(current + 1, f"{memory.describe()} on rung {current} "
                                     f"({rungs[min(current, len(rungs) - 1)].describe()}); "
                                     f"next: rung {current + 1} "
                                     f"({rungs[current + 1].describe()})")
    return NextStep(None, failure_reason(request, memory))


def starting_rung(claim: Claim, request: FinetuneRequest,
                  log_line: Callable[[str], None]) -> NextStep:
    """The rung this attempt trains on: the job's, one lower when the previous attempt's
    worker was killed by SIGKILL (the kernel's out-of-memory killer, most likely), which is
    then saved for later attempts and said in the log. `rung` None: no rung is left, the job
    must fail with `reason`."""
    rungs = ladder(request)
    with session_scope() as session:
        current = session.scalar(select(Job.memory_rung).where(Job.id == claim.job_id)) or 0
        killed = session.scalars(
            select(JobEvent.reason)
            .where(JobEvent.job_id == claim.job_id, JobEvent.attempt == claim.attempt - 1)
            .order_by(JobEvent.id)
        ).all()
    death = next((reason for reason in killed if reason and KILLED_BY_SIGKILL.search(reason)),
                 None)
    current = min(current, len(rungs) - 1)
    if death is None:
        if current:
            log_line(f"memory ladder: rung {current} of {len(rungs) - 1}: "
                     f"{rungs[current].describe()}, after running out of memory on the rungs "
                     f"above")
        return NextStep(current, "")
    memory = OutOfMemory(f"attempt {claim.attempt - 1}'s worker was killed ({death}), most "
                         f"likely by the kernel's out-of-memory killer",
                         capacity=_host_memory())
    step = next_step(request, current, memory)
    if step.rung is None:
        return step
    with session_scope() as session:
        jobs.set_memory_rung(session, claim, step.rung)
    log_line(f"memory ladder: {step.reason}; resuming from the last checkpoint")
    return step


def record_step(claim: Claim, step: NextStep) -> JobStatus | None:
    """Carry out `next_step`'s decision after an out-of-memory: hand the job back on the next
    rung (QUEUED, the attempt given back: running out of memory on one rung is no fault of
    the job while a lower one is left), or fail it with the reason. Returns the job's new
    status; None when the attempt no longer owns the job."""
    with session_scope() as session:
        if step.rung is None:
            done = jobs.transition(session, claim.job_id, JobStatus.FAILED,
                                   attempt=claim.attempt, reason=step.reason,
                                   error_code=ERROR_CODE)
            return JobStatus.FAILED if done else None
        return jobs.hand_back(session, claim, reason=f"memory ladder: {step.reason}",
                              memory_rung=step.rung)


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _host_memory(cgroup: Path = Path("/sys/fs/cgroup/memory.max")) -> str | None:
    """The worker's memory limit: its container's (cgroup v2), else the host's RAM."""
    try:
        limit = cgroup.read_text().strip()
        if limit != "max":
            return f"{_gib(int(limit))} (container limit)"
    except (OSError, ValueError):
        pass
    try:
        return f"{_gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} (host RAM)"
    except (OSError, ValueError):
        return None
