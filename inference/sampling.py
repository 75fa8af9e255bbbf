"""Choosing the next token of one sequence: greedy at temperature 0, else temperature and
nucleus (top_p) sampling from the sequence's own random generator, so that a seeded request
draws the same tokens whatever else shares its batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    seed: int | None


class TokenSampler:
    """One sequence's sampler. With a seed, choice `index` of a request is seeded with
    `seed + index`: reproducible, and the `n` choices still differ."""

    def __init__(self, params: SamplingParams, index: int = 0) -> None:
        self.params = params
        self._generator: torch.Generator | None = None
        if params.temperature > 0:
            seed = params.seed + index if params.seed is not None \
                else random.SystemRandom().getrandbits(63)
            # Generators on the CPU: the per-row draws are tiny, and a CPU generator gives the
            # same numbers whatever device the model is on.
            self._generator = torch.Generator(device="cpu").manual_seed(seed % 2**63)

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token id from one row of logits (vocabulary,), on the CPU."""
        if self._generator is None:
            return int(torch.argmax(logits))
        scores = logits.float() / self.params.temperature
        probs = torch.softmax(scores, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always).
            drop = cumulative - sorted_probs >= self.params.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))
