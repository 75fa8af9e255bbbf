"""Which process of a job's process group this is, and the agreements its ranks must reach.

A job on several devices runs as one `torchrun` process group (`worker.device_group` starts
it, `worker.rank_main` is each process). torchrun says who is who in the environment
(`RANK`, `LOCAL_RANK`, `WORLD_SIZE`); the Trainer (through accelerate) builds the DDP or FSDP
group from the same variables. A process outside torchrun is rank 0 of a group of one.

Every rank must stop at the same step: one that stops while another goes on into the next
step's forward pass leaves that one waiting forever in the gradient all-reduce. So a stop is
agreed on at the end of each optimizer step (`StopAgreement`): rank 0 reads the request, one
all-reduce of one number hands it to every rank, and all of them act on it at that step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from worker.pipeline.errors import StopReason

# A stop reason as one integer, for the all-reduce: 0 is none; a larger code wins when ranks
# disagree, though only rank 0 ever reads a request.
_CODES = {reason: code for code, reason in enumerate(StopReason, start=1)}
_REASONS = {code: reason for reason, code in _CODES.items()}


def world_size() -> int:
    """Processes in this job's group; 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank in the group; 0 outside torchrun."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its host: the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 reports, uploads checkpoints and writes the adapter; the others only train."""
    return rank() == 0


def in_process_group() -> bool:
    return world_size() > 1


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: an FSDP2 parameter is a DTensor holding this rank's shard, gathered
    from every rank here (a collective: all ranks call it for the same tensors, in the same
    order); any other tensor is itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def assign_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor (from `whole`) into `param`, this rank's shard of it under FSDP2."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    param.copy_(value)


def adapter_state(model: Any) -> dict[str, torch.Tensor] | None:
    """The trainable weights, whole, to save the adapter from under FSDP2; None otherwise
    (peft reads them from the model itself)."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    if not any(isinstance(p, DTensor) for p in params.values()):
        return None
    return {name: whole(p.detach()).cpu() for name, p in params.items() if p.requires_grad}


def describe_process_group(trainer: Any) -> str:
    """`process group: 2 ranks, FSDP over gloo`: what accelerate made of torchrun's group."""
    accelerator = trainer.accelerator
    kind = "FSDP" if accelerator.is_fsdp2 or trainer.is_fsdp_enabled else "DDP"
    return (f"process group: {accelerator.num_processes} ranks, {kind} over "
            f"{torch.distributed.get_backend()}")


class StopAgreement(TrainerCallback):
    """Agrees, at the end of every optimizer step and across every rank, on whether to stop.

    `read_request` is rank 0's source (the worker's stop request); `agreed()` is what every
    rank's `StopCallback` reads instead, and it only changes at a step's end, where all ranks
    are in step. It comes first among the callbacks, so the step's other callbacks see the
    new value. Before a checkpoint is uploaded, every rank has written its part of it (its RNG
    state): `on_save` waits for all of them.
    """

    def __init__(self, read_request: Callable[[], StopReason | None]) -> None:
        self.read_request = read_request
        self._agreed: StopReason | None = None

    def agreed(self) -> StopReason | None:
        return self._agreed

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._agreed is not None:
            return
        asked = self.read_request() if is_main_process() else None
        code = torch.tensor([_CODES[asked] if asked else 0], dtype=torch.int64,
                            device=_collective_device())
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        self._agreed = _REASONS.get(int(code.item()))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        torch.distributed.barrier()


def _collective_device() -> torch.device:
    """NCCL all-reduces tensors on the rank's GPU; gloo on the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")
