"""One process of a job's process group: `torchrun ... -m worker.rank_main GROUP_DIR`.

Every rank runs the same recipe (`run_job`) on the spec the worker wrote (`group_channel`);
the Trainer builds the DDP or FSDP group from torchrun's environment. Rank 0 reports through
`events.jsonl` and uploads checkpoints; the worker that started the group holds the lease and
writes everything to the database. The exit status tells torchrun whether the rank
succeeded: anything but a trained adapter is an error, so that torchrun ends the other ranks
at once instead of leaving them waiting for this one in a collective.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path

from shared.payload_secrets import redact_secrets, secret_values
from shared.storage import StorageUnreachable
from shared.storage_retry import retrying_storage
from worker import memory_ladder
from worker.group_channel import EventWriter, GroupSpec, SilentReporter
from worker.parent_death import die_with_parent

log = logging.getLogger("tunery.worker")

TRAINED, NOT_TRAINED = 0, 3


def main(argv: list[str]) -> int:
    # torchrun starts each rank in a session of its own: without this, a rank would train on
    # after torchrun was killed.
    die_with_parent(signal.SIGKILL)
    directory = Path(argv[0])
    spec = GroupSpec.read(directory, int(os.environ.get("RANK", "0")))
    logging.basicConfig(level=spec.settings.log_level.upper(),
                        format="%(asctime)s rank %(process)d %(levelname)s %(message)s")

    # After the spec: torch and transformers take seconds to import.
    from worker.pipeline.checkpoints import CheckpointStore
    from worker.pipeline.errors import PipelineError, TrainingStopped
    from worker.pipeline.job_dirs import job_working_directory
    from worker.pipeline.ranks import is_main_process, rank
    from worker.pipeline.run import run_job

    reporter: EventWriter | SilentReporter = (
        EventWriter(directory, spec.settings.leases.lease_seconds) if is_main_process()
        else SilentReporter(directory, rank()))
    secrets = secret_values(spec.request.model_dump(mode="json"))
    settings = spec.settings
    storage = retrying_storage(settings, reporter.log)
    checkpoints = CheckpointStore(
        storage, spec.job_id, every_steps=settings.training.checkpoint_every_steps,
        keep=settings.training.checkpoints_to_keep, attempt=spec.attempt,
    )
    join_cpu_group(settings.training.process_group_timeout_s)
    work_dir = directory / f"rank-{rank()}"
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with job_working_directory(work_dir / "cwd"):
            result = run_job(
                spec.request, work_dir, reporter, settings, checkpoints,
                hub_cache_dir=spec.hub_cache_dir,
                memory_rung=memory_ladder.rung_of(spec.request, spec.memory_rung),
                trainer_dir=directory / "trainer",
            )
    except TrainingStopped as stop:
        reporter.outcome("stopped", reason=stop.reason.value, step=stop.step)
        return NOT_TRAINED
    except StorageUnreachable as exc:
        reporter.outcome("storage_unreachable", message=str(exc))
        return NOT_TRAINED
    except PipelineError as exc:
        reporter.outcome("failed", message=redact_secrets(exc.message, secrets))
        return NOT_TRAINED
    except Exception as exc:
        kind = "out_of_memory" if memory_ladder.is_out_of_memory(exc) else "crashed"
        log.error("rank %d: %s", rank(), redact_secrets(traceback.format_exc(), secrets))
        reporter.outcome(kind, message=redact_secrets(f"{type(exc).__name__}: {exc}",
                                                       secrets)[:2000])
        return NOT_TRAINED
    if is_main_process():
        reporter.outcome(
            "trained", output_dir=str(result.output_dir), steps=result.steps,
            first_loss=result.first_loss, last_loss=result.last_loss,
            train_rows=result.train_rows, eval_rows=result.eval_rows,
            best_eval_loss=result.best_eval_loss, best_step=result.best_step,
            trained_tokens=result.trained_tokens,
        )
    return TRAINED


def join_cpu_group(timeout_s: int) -> None:
    """On CPU, make the gloo group here, with the collective timeout: transformers hands
    `ddp_timeout` to accelerate on GPUs only, and a CPU group would wait 30 minutes on a hung
    rank. accelerate then uses this group. On GPUs accelerate makes it (NCCL) with the same
    timeout."""
    import torch

    if torch.cuda.is_available() or torch.distributed.is_initialized():
        return
    torch.distributed.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
