"""A job on several devices: its training runs as a `torchrun` process group, one process per
device, started and watched by the worker that holds the job's lease.

The worker stays what it is for a job on one device: it renews the lease, reads cancel and
pause, writes the logs and metrics to the database, uploads the adapter and records the
outcome (`worker.attempt`). Only `run_job` moves into the group (`worker.rank_main`), whose
rank 0 reports through files (`group_channel`). So:

- a stop (cancel, pause, lost lease, time limit, this worker stopping) is written for the
  group, whose ranks agree on it at the end of a step (`pipeline.ranks.StopAgreement`) and
  stop there together, saving the step where a single process would;
- a rank that dies takes the group with it (torchrun runs with no restarts) and fails the
  attempt as a lost one: the job is retried, resuming from its last checkpoint;
- the worker's death takes the group with it too (`parent_death`), and a worker that stops
  answering (SIGSTOP) has its group stop as from a lost lease (`group_channel.EventWriter`);
  a rank that hangs fails the group after `TUNERY_PROCESS_GROUP_TIMEOUT_S` in a collective.

torchrun decides everything about the group itself (rendezvous, ranks, the backend: NCCL on
GPUs, gloo on CPU); nothing here schedules or communicates between ranks.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shared.jobs import Claim
from shared.schema import FinetuneRequest
from shared.settings import Settings
from shared.storage import StorageUnreachable
from worker.group_channel import (
    DiscardReports,
    EventReader,
    GroupSpec,
    forget_spec_once_read,
    mark_alive,
    request_stop,
)
from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped
from worker.pipeline.report import JobReporter
from worker.pipeline.run import TrainResult

log = logging.getLogger("tunery.worker")

# How often the worker reads the group's reports and checks on it.
POLL_S = 0.2
# How long a group asked to stop may take to end its step and save it before it is ended.
STOP_PATIENCE_S = 120.0
# How long a group that gave its outcome may take to exit before it is killed: its ranks
# finish together, and one that has not by then hangs (a stopped or stuck process).
EXIT_PATIENCE_S = 15.0
# After SIGTERM, torchrun ends its ranks (SIGTERM, then SIGKILL after its own 30 s).
TERMINATE_PATIENCE_S = 45.0
TORCHRUN_LOG = "torchrun.log"
# tqdm's bars (loading weights, writing shards): never the reason a group died.
_PROGRESS_BAR = re.compile(r"\d+%\||it/s\]")


class ProcessGroupFailed(Exception):
    """A rank died, or the group ended without an outcome: the attempt is lost, not the
    job's fault (`worker.attempt` retries it from its last checkpoint)."""


def train_on_devices(
    request: FinetuneRequest,
    work_dir: Path,
    reporter: JobReporter,
    settings: Settings,
    *,
    claim: Claim,
    memory_rung: int,
    hub_cache_dir: Path | None,
    lease_held: Callable[[], bool] = lambda: True,
) -> TrainResult:
    """Train `request` on `training_config.devices` devices of this worker, as `run_job`
    does on one; the adapter lies in the result's `output_dir` (rank 0's).

    Raises as `run_job` does (`TrainingStopped`, `PipelineError`, `StorageUnreachable`,
    torch's out-of-memory error) so that the attempt ends the same way, and
    `ProcessGroupFailed` when the group died without saying why, or stopped by itself
    because this worker went silent (`group_channel.EventWriter`) while the lease is still
    held: the attempt is lost either way.

    The group's reports reach `reporter` only while `lease_held()` (which renews a stale
    lease on asking): a worker continued after a SIGSTOP longer than its lease may find
    another attempt owning the job, whose log and metrics are not its to write."""
    devices = request.training_config.devices
    owned = settings.training.worker_devices
    if devices > owned:
        # Routing sends a job only to a class whose workers own enough devices; this is a
        # worker configured against its class.
        raise PipelineError(f"training_config.devices {devices}: this worker owns {owned} "
                            f"(TUNERY_WORKER_DEVICES); its device class promises more")
    strategy = request.training_config.strategy
    if strategy == "fsdp" and not _has_gpus(devices):
        # accelerate turns FSDP on for groups of accelerators only; on CPU it would train
        # DDP under FSDP's name.
        raise PipelineError(f"training_config.strategy 'fsdp' needs {devices} GPUs; this "
                            f"worker trains on CPU: use strategy 'ddp'")
    directory = work_dir / "group"
    directory.mkdir(mode=0o700, parents=True)
    GroupSpec(request, settings, claim.job_id, claim.attempt, memory_rung,
              hub_cache_dir).write(directory)
    reporter.log(f"devices: {devices} processes ({strategy}) under torchrun; an optimizer step "
                 f"trains micro_batch_size x gradient_accumulation_steps x {devices} examples")
    process = _start(directory, devices)
    reader = EventReader(directory)
    stop_at: float | None = None
    outcome_at: float | None = None
    try:
        while (code := process.poll()) is None:
            mark_alive(directory)
            forget_spec_once_read(directory, devices)
            reader.relay(reporter if lease_held() else DiscardReports())
            now = time.monotonic()
            reason = reporter.should_stop()
            if reason is not None and stop_at is None:
                request_stop(directory, reason)
                stop_at = now
                if reader.phase != "training":
                    # Nothing to save before the first step: loading ends at once.
                    _terminate(process)
            if reader.outcome is not None and outcome_at is None:
                outcome_at = now
            overdue = ((stop_at is not None and now - stop_at > STOP_PATIENCE_S)
                       or (outcome_at is not None and now - outcome_at > EXIT_PATIENCE_S))
            if overdue:
                log.warning("job %s: process group slow to exit; ending it", claim.job_id)
                _terminate(process, kill=outcome_at is not None)
            time.sleep(POLL_S)
    finally:
        if process.poll() is None:  # this worker is being torn down: so is its group
            _terminate(process)
    reader.relay(reporter if lease_held() else DiscardReports())
    outcome = reader.any_outcome()
    if outcome is None:
        stopped = reporter.should_stop()
        if stopped is not None:
            raise TrainingStopped(stopped)
        raise ProcessGroupFailed(f"process group of {devices} exited with status {code} "
                                 f"without an outcome: {_last_lines(directory / TORCHRUN_LOG)}")
    silent = (outcome["outcome"] == "stopped" and outcome["reason"] == StopReason.LEASE_LOST
              and reporter.should_stop() != StopReason.LEASE_LOST)
    if silent and lease_held():
        raise ProcessGroupFailed("the process group stopped by itself: its worker did not "
                                 "answer for a lease (stopped or stuck)")
    _raise_unless_trained(outcome)
    return TrainResult(
        output_dir=Path(outcome["output_dir"]), steps=int(outcome["steps"]),
        first_loss=outcome["first_loss"], last_loss=outcome["last_loss"],
        train_rows=int(outcome["train_rows"]), eval_rows=int(outcome["eval_rows"]),
        best_eval_loss=outcome["best_eval_loss"], best_step=outcome["best_step"],
        trained_tokens=outcome["trained_tokens"],
    )


def _raise_unless_trained(outcome: dict) -> None:
    kind = outcome["outcome"]
    if kind == "trained":
        return
    if kind == "stopped":
        raise TrainingStopped(StopReason(outcome["reason"]), step=outcome.get("step"))
    if kind == "failed":
        raise PipelineError(outcome["message"])
    if kind == "storage_unreachable":
        raise StorageUnreachable(outcome["message"])
    if kind == "out_of_memory":
        import torch

        raise torch.OutOfMemoryError(outcome["message"])
    raise ProcessGroupFailed(f"a rank crashed: {outcome['message']}")


def _has_gpus(count: int) -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= count


def _start(directory: Path, devices: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    command = [
        sys.executable, "-m", "worker.parent_death",
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", f"--nproc-per-node={devices}",
        "--max-restarts", "0", "--monitor-interval", "0.5",
        "-m", "worker.rank_main", str(directory),
    ]
    with (directory / TORCHRUN_LOG).open("wb") as output:
        # A session of its own: a signal meant for the worker's process group (Ctrl-C, a
        # supervisor's SIGTERM) reaches the group through the worker, which asks it to stop
        # at a step rather than be killed mid-step.
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                cwd=directory, start_new_session=True)


def _terminate(process: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    """End torchrun, which ends its ranks; SIGKILL if it does not go, or at once with `kill`
    (its ranks die with it: `parent_death`)."""
    if process.poll() is not None:
        return
    if kill:
        process.kill()
        process.wait()
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(TERMINATE_PATIENCE_S)
    except subprocess.TimeoutExpired:
        process.kill()  # its ranks die with it (`parent_death`)
        process.wait()


def _last_lines(path: Path, count: int = 5) -> str:
    """The end of torchrun's output, progress bars left out: what says why the group died."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no output)"
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines()
             if line.strip() and not _PROGRESS_BAR.search(line)]
    return " | ".join(lines[-count:])[-1500:] or "(no output)"
