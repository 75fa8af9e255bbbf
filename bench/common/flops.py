"""Model FLOPs per trained token and the matmul FLOP/s this machine reaches at the model's
shapes, for the "machine fraction" column.

FLOPs per token = 6 x (N_nonembedding + vocab x hidden): a forward pass costs 2 FLOPs per
weight per token in every linear layer plus the LM head (vocab x hidden, counted even when
tied to the embedding, which itself is a lookup), and forward + backward is counted as 3
forwards. Attention scores (QK^T, AV) are left out. With LoRA the backward computes no base
weight gradients, so the work really done is nearer 4N than 6N; the standard 6N is kept so the
fraction compares with published MFU figures, and it can exceed what the model truly computes.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def model_shapes(config: Any) -> dict[str, int]:
    return {
        "hidden": int(config.hidden_size),
        "intermediate": int(config.intermediate_size),
        "vocab": int(config.vocab_size),
        "layers": int(config.num_hidden_layers),
    }


def flops_per_token(model: Any) -> dict[str, float]:
    """{'nonembedding_params', 'head_params', 'flops_per_token'} of a (base) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    seen: set[int] = set()
    total = 0
    for name, param in base.named_parameters():
        if id(param) in seen or "lora_" in name:
            continue
        seen.add(id(param))
        # A 4-bit weight is stored packed; count the parameters it stands for.
        quant_state = getattr(param, "quant_state", None)
        total += int(quant_state.shape.numel()) if quant_state is not None else param.numel()
    nonembedding = total - embedding.numel()
    head = embedding.shape[0] * embedding.shape[1]
    return {
        "nonembedding_params": nonembedding,
        "head_params": head,
        "flops_per_token": 6.0 * (nonembedding + head),
    }


def _matmul_rate(m: int, k: int, n: int, *, dtype: torch.dtype, repeats: int,
                 min_seconds: float) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up: thread pool, allocator
    best = float("inf")
    start = time.perf_counter()
    for i in range(repeats * 100):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
        if i + 1 >= repeats and time.perf_counter() - start >= min_seconds:
            break
    return 2.0 * m * k * n / best


def matmul_flops(
    hidden: int, intermediate: int, vocab: int, layers: int, *, dtype: torch.dtype,
    tokens: int = 1024, repeats: int = 3, min_seconds: float = 0.5,
) -> dict[str, float]:
    """`dtype` torch.matmul FLOP/s at [tokens x hidden] @ [hidden x intermediate] (the MLP) and
    [tokens x hidden] @ [hidden x vocab] (the LM head), best of `repeats`, with this process's
    thread count; `model_mix` weighs the two by the model's own FLOPs (layers x 3 MLP matmuls
    of hidden x intermediate plus about 2 hidden x hidden for attention, against the head)."""
    timing = {"dtype": dtype, "repeats": repeats, "min_seconds": min_seconds}
    body = _matmul_rate(tokens, hidden, intermediate, **timing)
    head = _matmul_rate(tokens, hidden, vocab, **timing)
    body_flops = layers * (3 * hidden * intermediate + 2 * hidden * hidden)
    head_flops = hidden * vocab
    mix = (body_flops + head_flops) / (body_flops / body + head_flops / head)
    return {
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "mlp_flops_per_s": body,
        "lm_head_flops_per_s": head,
        "model_mix_flops_per_s": mix,
    }
