"""Whether a training run's activations fit in memory without gradient checkpointing.

Checkpointing recomputes each decoder layer's forward in the backward pass: about a third more
compute for a fraction of the activation memory. It is on when the request asks for it, and
otherwise only when the largest batch of the run would not fit: what autograd keeps for the
backward is measured on the model itself, by two short probe forwards that count the bytes of
every tensor saved for backward, so no per-architecture formula can be wrong about it.

Per token, a decoder keeps a fixed number of bytes per layer (norms, projections, MLP) plus,
where the attention materialises its weights (`cpu_attention`, eager), bytes in proportion to
the positions the token attends to. Two probe lengths give both terms; a batch of `rows` rows
padded to `longest` then keeps rows x longest x (fixed + per_position x longest).

The probes cost two forwards (0.4 s for SmolLM2 on 2 CPU cores, before every job's first
step), so for the dense decoders `labelled_loss` knows they run only when a generous bound
from the model's sizes alone does not fit already: float32 for every tensor a layer could keep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.pipeline.labelled_loss import LOGITS_CHUNK_BYTES, causal_lm_parts
from worker.pipeline.model import enable_gradient_checkpointing, loaded_dtype
from worker.pipeline.report import LogFn

# Long enough that the attention term shows over per-forward tensors (rotary tables, masks)
# that shrink per token with length: SmolLM2 at 32 and 64 positions gave a per-position term
# of 0, and its cost at 1,024 positions was then underestimated by 43%; at 128 and 256, by 6%.
PROBE_LENGTHS = (128, 256)
# Activations are at their peak when the backward starts; the backward itself holds a layer's
# gradients and the allocator fragments. Planning to 80% of the budget leaves that room.
USABLE_SHARE = 0.8
# The labelled loss holds about three chunks of logits at once (logits, their gradient, a
# recomputed chunk), whatever the batch.
LOSS_BYTES = 3 * LOGITS_CHUNK_BYTES


@dataclass(frozen=True)
class ActivationCost:
    """Bytes autograd saves per token, as a function of the row's length."""

    per_token: float
    per_token_and_position: float

    def batch_bytes(self, rows: int, longest: int) -> float:
        return rows * longest * (self.per_token + self.per_token_and_position * longest)


@dataclass(frozen=True)
class CheckpointingPlan:
    checkpoint: bool
    activation_bytes: float
    budget_bytes: float

    def describe(self) -> str:
        gib = 2**30
        return (f"the largest batch keeps about {self.activation_bytes / gib:.1f} GiB of "
                f"activations for the backward, {self.budget_bytes / gib:.1f} GiB available")


def saved_tensor_bytes(model: Any, input_ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward of the
    decoder on `input_ids` (parameters excluded: they live anyway)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    try:
        # Dropout draws from the global generator: the probe must not shift the run's draws.
        with (
            torch.random.fork_rng(devices=[]),
            torch.enable_grad(),
            _autocast_like_training(model),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        ):
            decoder = model.get_base_model() if hasattr(model, "get_base_model") else model
            decoder.get_decoder()(input_ids=input_ids, use_cache=False)
    finally:
        model.train(was_training)
    return sum(storages.values())


def checkpoint_if_short_of_memory(
    model: Any, batch_shapes: Iterable[tuple[int, int]], *, limit_bytes: float | None,
    log: LogFn,
) -> None:
    """Turn gradient checkpointing on when the run's costliest batch would not fit in what the
    device has free (at most `limit_bytes`); a request that asked for it has it already."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_activation_checkpointing", False):
        return
    shapes = list(batch_shapes)
    budget = available_memory_bytes(model, limit_bytes)
    bound = activation_bound(base.config) if causal_lm_parts(model) is not None else None
    if bound is not None and not plan_checkpointing(bound, shapes, budget_bytes=budget).checkpoint:
        return
    plan = plan_checkpointing(measure_activation_cost(model), shapes, budget_bytes=budget)
    if plan.checkpoint:
        enable_gradient_checkpointing(model)
        log(f"gradient checkpointing on: {plan.describe()}")


def activation_bound(config: Any) -> ActivationCost | None:
    """More than a dense decoder layer keeps per token: 16 hidden-sized and 6 intermediate-sized
    float32 tensors (norm inputs and outputs, projections, residuals; gate, up, activation,
    product) and float32 scores and weights for every head and position. SmolLM2 keeps about
    half of that in fp32, a quarter in bf16. None when the config lacks a size."""
    sizes = [getattr(config, name, None) for name in
             ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")]
    if not all(isinstance(size, int) and size > 0 for size in sizes):
        return None
    hidden, intermediate, heads, layers = (int(size) for size in sizes if size is not None)
    return ActivationCost(per_token=4.0 * layers * (16 * hidden + 6 * intermediate),
                          per_token_and_position=4.0 * layers * 2 * heads)


def measure_activation_cost(model: Any) -> ActivationCost:
    """Fit `ActivationCost` to the bytes saved by one-row probes at `PROBE_LENGTHS`."""
    device = model.get_input_embeddings().weight.device
    short, long = PROBE_LENGTHS
    # Token 0 is in every vocabulary; which tokens they are changes no tensor's size.
    saved = [
        saved_tensor_bytes(model, torch.zeros((1, n), dtype=torch.long, device=device)) / n
        for n in PROBE_LENGTHS
    ]
    per_position = max(0.0, (saved[1] - saved[0]) / (long - short))
    return ActivationCost(per_token=saved[0] - per_position * short,
                          per_token_and_position=per_position)


def plan_checkpointing(cost: ActivationCost, batch_shapes: Iterable[tuple[int, int]], *,
                       budget_bytes: float) -> CheckpointingPlan:
    """Checkpoint when the costliest of the run's batches, (rows, longest row) each, would
    keep more than `USABLE_SHARE` of `budget_bytes` for the backward."""
    activations = max(cost.batch_bytes(rows, longest) for rows, longest in batch_shapes)
    activations += LOSS_BYTES
    return CheckpointingPlan(
        checkpoint=activations > USABLE_SHARE * budget_bytes,
        activation_bytes=activations,
        budget_bytes=budget_bytes,
    )


def available_memory_bytes(model: Any, limit_bytes: float | None = None) -> float:
    """Memory training can still use on the model's device: free GPU memory, or on CPU the
    RAM the machine and the container (cgroup limit) still allow; at most `limit_bytes`."""
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        free = float(torch.cuda.mem_get_info(device)[0])
    else:
        import psutil

        free = float(psutil.virtual_memory().available)
        container = _cgroup_headroom_bytes()
        if container is not None:
            free = min(free, container)
    return free if limit_bytes is None else min(free, limit_bytes)


def _cgroup_headroom_bytes(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """A container's memory limit minus its usage (cgroup v2); None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        usage = (root / "memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max":
        return None
    return float(int(limit) - int(usage))


@contextlib.contextmanager
def _autocast_like_training(model: Any) -> Iterator[None]:
    dtype = loaded_dtype(model)
    device = model.get_input_embeddings().weight.device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        yield
