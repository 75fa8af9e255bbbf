"""Tokenized examples in flat, memory-mapped arrays: what the data phase writes and the
Trainer reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.dataset_files import LoadedDataset
from shared.loss_mask import IGNORE_INDEX, TokenizedExample
from shared.schema import DataConfig, TrainingConfig
from worker.pipeline.examples import evaluated_sample, render_and_tokenize, split
from worker.pipeline.token_store import (
    IDS_FILE,
    TRAINED_FILE,
    TokenStore,
    as_token_store,
    open_token_store,
)

EXAMPLES = [
    TokenizedExample([1, 5, 6, 2], [IGNORE_INDEX, IGNORE_INDEX, 6, 2]),
    TokenizedExample([1, 7, 2], [IGNORE_INDEX, 7, 2]),
    TokenizedExample([1, 8, 9, 10, 11, 2], [IGNORE_INDEX, 8, 9, 10, 11, 2]),
]


def test_a_store_reads_back_what_went_in_and_takes_views() -> None:
    store = as_token_store(EXAMPLES)

    assert list(store) == EXAMPLES
    assert store.lengths.tolist() == [4, 3, 6] and store.tokens == 13
    view = store.take([2, 0])
    assert list(view) == [EXAMPLES[2], EXAMPLES[0]]
    assert view.lengths.tolist() == [6, 4]
    assert list(view.take([1])) == [EXAMPLES[0]]
    assert list(store[1:]) == EXAMPLES[1:]
    assert store[-1] == EXAMPLES[-1]
    assert store == EXAMPLES and store != EXAMPLES[:2]


def test_the_data_phase_writes_compact_files_that_the_split_only_indexes(
    tiny_tokenizer: Any, tmp_path: Path,
) -> None:
    rows = [{"q": f"What is {i} + {i}?", "a": f"It is {2 * i}."} for i in range(300)]
    data = DataConfig(data_path="x", prompt_template="Q: {q}\nA: {a}", cutoff_len=64)
    directory = tmp_path / "tokens"

    store = render_and_tokenize(LoadedDataset(["q", "a"], rows, "rows"), tiny_tokenizer, data,
                                log=lambda line: None, directory=directory)

    # 4 bytes a token id, 1 a trained flag: no Python ints in memory.
    assert (directory / IDS_FILE).stat().st_size == 4 * store.tokens
    assert (directory / TRAINED_FILE).stat().st_size == store.tokens
    assert open_token_store(directory) == store
    in_memory = render_and_tokenize(LoadedDataset(["q", "a"], rows, "rows"), tiny_tokenizer,
                                    data, log=lambda line: None)
    assert in_memory == store
    train, validation = split(store, {"train": 0.8, "validation": 0.2})
    sample = evaluated_sample(validation, train_examples=len(train),
                              config=TrainingConfig(), compute_share=1.0)
    assert isinstance(train, TokenStore) and isinstance(sample, TokenStore)
    assert (len(train), len(validation)) == (240, 60)
    # The same examples as a split of plain lists.
    list_train, list_validation = split(list(store), {"train": 0.8, "validation": 0.2})
    assert train == list_train and validation == list_validation
