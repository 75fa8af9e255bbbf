"""A batch's decoding state, and joining two of them: rows that arrive while a batch runs are
prefilled on their own, then join it between two steps.

Both batches are left-padded: the shorter one is padded further on the left (zero keys and
values, attention mask 0), which changes nothing for its rows since masked positions get no
attention weight and every row carries its own position ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BatchState:
    """What the next forward needs besides the new tokens: each row's attention mask over
    the cache (rows, width), its last position (rows, 1), the KV cache, and the logits its
    next token is drawn from (rows, vocabulary)."""

    mask: torch.Tensor
    positions: torch.Tensor
    cache: Any
    logits: torch.Tensor

    def keep(self, index: torch.Tensor) -> None:
        """Only the rows at `index`, in that order."""
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.logits = self.logits[index]


def can_join(cache: Any) -> bool:
    """Whether `cache` is one `join` can pad: transformers' dynamic layers of full
    attention (a sliding-window layer keeps only its window, which padding would shift)."""
    from transformers.cache_utils import DynamicLayer

    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized
                                for layer in layers)


def join(state: BatchState, other: BatchState) -> None:
    """Append `other`'s rows to `state`'s (both `can_join`)."""
    width = max(state.mask.shape[1], other.mask.shape[1])
    state.mask = torch.cat([_left_pad(state.mask, width, dim=1),
                            _left_pad(other.mask, width, dim=1)])
    state.positions = torch.cat([state.positions, other.positions])
    state.logits = torch.cat([state.logits, other.logits])
    for layer, extra in zip(state.cache.layers, other.cache.layers, strict=True):
        layer.keys = torch.cat([_left_pad(layer.keys, width, dim=2),
                                _left_pad(extra.keys, width, dim=2)])
        layer.values = torch.cat([_left_pad(layer.values, width, dim=2),
                                  _left_pad(extra.values, width, dim=2)])


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
