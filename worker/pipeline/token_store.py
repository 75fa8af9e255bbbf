"""Tokenized examples as three flat arrays: every example's token ids one after the other
(int32), whether each token is trained (one byte), and where each example starts (int64).

A million examples of about 120 tokens take about 600 MB here, memory-mapped from the job's
scratch dir, where Python lists of ints took about 6 KB an example in the worker's memory.
The split and the evaluation sample are views (`take`): index arrays into the same files,
never copies of the tokens. An item is a `TokenizedExample` made when it is read, so the
Trainer's datasets and the collators see what they always saw.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from shared.loss_mask import IGNORE_INDEX, TokenizedExample

IDS_FILE = "ids.int32"
TRAINED_FILE = "trained.uint8"
STARTS_FILE = "starts.int64"
TOKEN_ID = np.int32


@dataclass(frozen=True)
class TokenBatch:
    """Labelled examples of one tokenizer batch: their tokens back to back."""

    ids: np.ndarray
    trained: np.ndarray
    lengths: np.ndarray

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.trained) == int(self.lengths.sum())


class TokenStore(Sequence[TokenizedExample]):
    """Examples read from flat arrays; `rows` (an index array) makes it a view of some of them,
    in that order."""

    def __init__(self, ids: np.ndarray, trained: np.ndarray, starts: np.ndarray,
                 rows: np.ndarray | None = None) -> None:
        assert len(starts) >= 1 and len(ids) == len(trained) == int(starts[-1])
        self._ids, self._trained, self._starts = ids, trained, starts
        self._rows = rows

    def __len__(self) -> int:
        return len(self._starts) - 1 if self._rows is None else len(self._rows)

    @overload
    def __getitem__(self, index: int) -> TokenizedExample: ...
    @overload
    def __getitem__(self, index: slice) -> TokenStore: ...
    def __getitem__(self, index: int | slice) -> TokenizedExample | TokenStore:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        ids, trained = self.arrays(index)
        return TokenizedExample(ids.tolist(), np.where(trained, ids, IGNORE_INDEX).tolist())

    def __iter__(self) -> Iterator[TokenizedExample]:
        for index in range(len(self)):
            yield self[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(mine == theirs for mine, theirs in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Example `index`'s token ids and trained mask, as views of the files."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = index if self._rows is None else int(self._rows[index])
        start, end = int(self._starts[row]), int(self._starts[row + 1])
        return self._ids[start:end], self._trained[start:end]

    def take(self, indices: Sequence[int] | np.ndarray) -> TokenStore:
        """The examples at `indices` (of this store), in that order: a view, no tokens copied."""
        positions = np.asarray(indices, dtype=np.int64)
        rows = positions if self._rows is None else self._rows[positions]
        return TokenStore(self._ids, self._trained, self._starts, rows)

    @property
    def lengths(self) -> np.ndarray:
        """Each example's token count, in this store's order."""
        all_lengths = np.diff(self._starts)
        return all_lengths if self._rows is None else all_lengths[self._rows]

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


class TokenStoreWriter:
    """Collects `TokenBatch`es into a `TokenStore`: into files under `directory`, memory-mapped
    once finished, or, without a directory, in memory (small sets, tests)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._lengths: list[np.ndarray] = []
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._files: tuple[Any, Any] | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._files = ((directory / IDS_FILE).open("wb"),
                           (directory / TRAINED_FILE).open("wb"))

    def add(self, batch: TokenBatch) -> None:
        ids = batch.ids.astype(TOKEN_ID, copy=False)
        trained = batch.trained.astype(np.uint8, copy=False)
        if self._files is not None:
            self._files[0].write(ids.tobytes())
            self._files[1].write(trained.tobytes())
        else:
            self._chunks.append((ids, trained))
        self._lengths.append(batch.lengths.astype(np.int64, copy=False))

    def finish(self) -> TokenStore:
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        if self._files is None or self.directory is None:
            ids = np.concatenate([c[0] for c in self._chunks]) if self._chunks else \
                np.zeros(0, TOKEN_ID)
            trained = np.concatenate([c[1] for c in self._chunks]) if self._chunks else \
                np.zeros(0, np.uint8)
            return TokenStore(ids, trained.view(bool), starts)
        for file in self._files:
            file.close()
        starts.tofile(self.directory / STARTS_FILE)
        return open_token_store(self.directory)


def open_token_store(directory: Path) -> TokenStore:
    """The store a `TokenStoreWriter` finished in `directory`, memory-mapped read-only."""
    starts = np.fromfile(directory / STARTS_FILE, dtype=np.int64)
    return TokenStore(_mapped(directory / IDS_FILE, TOKEN_ID),
                      _mapped(directory / TRAINED_FILE, np.uint8).view(bool), starts)


def _mapped(path: Path, dtype: Any) -> np.ndarray:
    # np.memmap refuses an empty file; an empty store has nothing to map.
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def as_token_store(examples: Iterable[TokenizedExample] | TokenStore) -> TokenStore:
    """`examples` as a store: itself if it is one, else copied into memory (a list of
    examples, as tests and the benchmarks build)."""
    if isinstance(examples, TokenStore):
        return examples
    writer = TokenStoreWriter()
    for example in examples:
        ids = np.asarray(example.input_ids, dtype=TOKEN_ID)
        labels = np.asarray(example.labels)
        writer.add(TokenBatch(ids, labels != IGNORE_INDEX, np.array([len(ids)])))
    return writer.finish()
