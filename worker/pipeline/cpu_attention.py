"""Causal attention for training on CPU: plain matmuls over query blocks, skipping the blocks
a causal mask hides.

PyTorch's fused CPU attention (what SDPA dispatches to) is slow for training at the lengths of
fine-tuning data: its forward + backward costs several times two plain matmuls and a softmax,
and at a few hundred positions attention becomes a large share of a small model's training
step (`bench/train_throughput.py` times the service's recipe against transformers' default
attention).

Each block of queries attends to the keys up to its own last position only; inside that range
the mask (transformers' SDPA boolean mask: causal plus padding, or None for "causal, no
padding") hides the rest. Key and value heads are shared by their query-head group without
copying them (`repeat_kv`): the group's queries are stacked into one matrix per key head.

A packed row (padding-free batches, `batching`) comes with the cumulative sequence lengths of
its examples (`cu_seq_lens_q`, as flash-attention's variable-length kernel takes them): each
example is computed alone, causal within itself, and no block across two examples is.

The arithmetic is the textbook one: scores and weights in the input dtype, the softmax
accumulated in float32 by the kernel, much as transformers' eager attention does. Anything
but training-shaped causal attention (generation with a cache, sliding windows, soft-capping,
attention sinks, bidirectional attention, a float mask) goes to transformers' own SDPA
function unchanged.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch.nn import functional

NAME = "tunery_cpu_causal"
# Blocks of 128 query positions: at a few hundred positions most of the hidden upper triangle
# is skipped, while smaller blocks, which would skip more, make each matmul too small to run
# at full speed.
QUERY_BLOCK = 128
_FEATURES_ONLY_SDPA_HAS = ("softcap", "sliding_window", "s_aux", "position_bias")


def register() -> str:
    """Make `NAME` an `attn_implementation` transformers knows; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, causal_attention)
    # The same masks SDPA gets: boolean (True = attend), or None for causal without padding.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def causal_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (batch, heads, q_len, dim), key and value
    (batch, kv_heads, kv_len, dim); returns (batch, q_len, heads, dim)."""
    if not _handles(module, query, key, attention_mask, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    dropout = dropout if module.training else 0.0
    starts = packed_starts(query, kwargs)
    if starts is None:
        output = _blocked(query, key, value, attention_mask, scale, dropout)
    else:
        # A packed row: each example alone, causal within itself. The block-diagonal mask
        # transformers built from the position ids says the same, at the cost of every
        # cross-example block.
        output = torch.cat([
            _blocked(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                     None, scale, dropout)
            for start, end in itertools.pairwise(starts)
        ], dim=2)
    return output.transpose(1, 2).contiguous(), None


def packed_starts(query: torch.Tensor, kwargs: dict[str, Any]) -> list[int] | None:
    """Where each example of a packed row starts, and the row's end, from the cumulative
    sequence lengths the padding-free collator passes (`cu_seq_lens_q`); None for a batch of
    ordinary rows."""
    cumulative = kwargs.get("cu_seq_lens_q")
    if cumulative is None or query.shape[0] != 1:
        return None
    starts = [int(n) for n in cumulative.tolist()]
    if starts[0] != 0 or starts[-1] != query.shape[2] or starts != sorted(starts):
        raise ValueError(f"cu_seq_lens_q {starts} do not cut a row of {query.shape[2]} positions")
    return starts


def _blocked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, scale: float,
             dropout: float) -> torch.Tensor:
    """Causal attention of query blocks; (batch, heads, q_len, dim)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    positions = torch.arange(length, device=query.device)
    blocks = []
    for start in range(0, length, QUERY_BLOCK):
        end = min(length, start + QUERY_BLOCK)
        # Queries start..end-1 see keys 0..end-1 at most.
        rows, seen = end - start, end
        grouped = query[:, :, start:end].reshape(batch, kv_heads, group * rows, dim)
        scores = torch.matmul(grouped, key[:, :, :seen].transpose(-1, -2)) * scale
        scores = scores.view(batch, kv_heads, group, rows, seen)
        if attention_mask is None:
            visible = positions[:seen] <= positions[start:end, None]
        else:
            visible = attention_mask[:, :, start:end, :seen].unsqueeze(2)
        # The dtype's lowest value, not -inf: a row that sees nothing (left padding) gets a
        # uniform average instead of NaN, as in eager attention; its output is never trained on.
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        # In the scores' dtype: the CPU kernel accumulates bf16 in float32 anyway, and autograd
        # then keeps only these weights for the backward, not a float32 copy beside them
        # (a third of the memory the attention keeps).
        weights = torch.softmax(scores, dim=-1)
        if dropout > 0.0:
            weights = functional.dropout(weights, p=dropout)
        out = torch.matmul(weights.view(batch, kv_heads, group * rows, seen), value[:, :, :seen])
        blocks.append(out.view(batch, heads, rows, dim))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


def _handles(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        return False
    if any(kwargs.get(name) is not None for name in _FEATURES_ONLY_SDPA_HAS):
        return False
    # A boolean mask shared by all heads, as transformers builds it for SDPA.
    if attention_mask is not None and (
        attention_mask.dtype != torch.bool or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
    ):
        return False
    # Training and evaluation: as many queries as keys. Generation (queries after cached keys)
    # keeps SDPA's own conventions.
    if query.shape[2] != key.shape[2] or query.shape[2] == 1:
        return False
    return query.shape[1] % key.shape[1] == 0
