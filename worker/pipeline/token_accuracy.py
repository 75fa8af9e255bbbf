"""Mean token accuracy: the share of labelled positions whose most likely next token (the
argmax of its logits) is the label, labels shifted as for the loss and -100 positions left
out. `TokenAccuracy` counts it over the micro-batches between two log lines, on the device and
without a synchronisation per batch; the count is read once per log line."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.pipeline.labels import IGNORE_INDEX

# The Trainer log keys, and metric names, of the training steps' and the evaluations' accuracy.
TRAIN_ACCURACY = "mean_token_accuracy"
EVAL_ACCURACY = "eval_mean_token_accuracy"


def correct_predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many positions of `logits` (..., vocab) predict their target (...); the targets
    already shifted, -100 where no label is. No gradient."""
    with torch.no_grad():
        labelled = targets != IGNORE_INDEX
        return ((logits.argmax(dim=-1) == targets) & labelled).sum()


class TokenAccuracy:
    """Correct and labelled positions counted since the last `take`."""

    def __init__(self) -> None:
        self._correct: torch.Tensor | None = None
        self._labelled: torch.Tensor | None = None

    def add(self, correct: torch.Tensor, labelled: torch.Tensor | int) -> None:
        correct = correct.detach().to(torch.int64)
        labelled = torch.as_tensor(labelled, dtype=torch.int64, device=correct.device)
        if self._correct is None or self._labelled is None:
            self._correct, self._labelled = correct, labelled
        else:
            self._correct = self._correct + correct
            self._labelled = self._labelled + labelled

    def add_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count `logits` (batch, positions, vocab) against the shifted `targets`."""
        targets = targets.to(logits.device)
        self.add(correct_predictions(logits, targets), (targets != IGNORE_INDEX).sum())

    def take(
        self, combine: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> float | None:
        """The accuracy since the last `take` and a fresh count; None where nothing was
        counted (or no position was labelled). `combine` sums a tensor over the ranks of a
        process group; every rank must then call `take` at the same point, counted or not."""
        correct, labelled = self._correct, self._labelled
        self._correct = self._labelled = None
        counts = (torch.stack([correct, labelled]) if correct is not None and labelled is not None
                  else torch.zeros(2, dtype=torch.int64))
        if combine is not None:
            counts = combine(counts)
        hits, total = (int(n) for n in counts.tolist())
        return hits / total if total else None
