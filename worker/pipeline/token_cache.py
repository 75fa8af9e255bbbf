"""Tokenized examples kept in storage beside the uploaded dataset they came from, so that a
resumed attempt, a retry and a repeated job skip downloading and tokenizing it.

One folder per dataset and fingerprint (`shared.storage_keys.tokenized_prefix`). The
fingerprint is a hash of everything that decides the tokens besides the rows: the tokenizer
(its serialized core, chat template and special tokens), the prompt template, cutoff_len,
train_on_inputs and `FORMAT_VERSION`. An uploaded dataset never changes after its checks, so
its id stands for its rows; deleting the dataset deletes the folder.

The manifest is written last and read first: a folder without one was cut off mid-upload and
is tokenized again. The cache only ever saves time: a storage error is a log line, and the
job tokenizes as if there were no cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.schema import DataConfig
from shared.storage import Storage, StorageError
from shared.storage_keys import tokenized_prefix
from worker.pipeline.interrupts import uninterruptible
from worker.pipeline.report import LogFn
from worker.pipeline.token_store import (
    IDS_FILE,
    STARTS_FILE,
    TRAINED_FILE,
    TokenStore,
    open_token_store,
)

# Bumped whenever the files or the labelling rule change: older folders are then never read.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
FILES = (IDS_FILE, TRAINED_FILE, STARTS_FILE)


def fingerprint(tokenizer: Any, data: DataConfig) -> str:
    """What decides the tokens of an uploaded dataset's rows, hashed."""
    core = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) \
        else repr(sorted(tokenizer.get_vocab().items()))
    decided_by = {
        "format": FORMAT_VERSION,
        "tokenizer": hashlib.sha256(core.encode()).hexdigest(),
        "tokenizer_class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": [tokenizer.bos_token_id, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, tokenizer.truncation_side],
        "prompt_template": data.prompt_template,
        "cutoff_len": data.cutoff_len,
        "train_on_inputs": data.train_on_inputs,
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CachedTokens:
    store: TokenStore
    lines: list[str]
    """What tokenizing them logged, when they were tokenized."""

    def report(self, log: LogFn) -> None:
        log(f"tokenized examples read from the cache: {len(self.store)} examples, "
            f"{self.store.tokens} tokens, tokenized before from this dataset with the same "
            "tokenizer, template and cutoff_len; then:")
        for line in self.lines:
            log(line)


class TokenCache:
    """The tokenized examples of dataset `dataset_id` under `fingerprint`."""

    def __init__(self, storage: Storage, dataset_id: str, fingerprint: str) -> None:
        self.storage = storage
        self.prefix = f"{tokenized_prefix(dataset_id)}{fingerprint}/"

    def load(self, directory: Path, *, log: LogFn) -> CachedTokens | None:
        """The cached store, downloaded into `directory` and memory-mapped; None when there is
        none (or it cannot be read, which is logged)."""
        try:
            if not self.storage.exists(self.prefix + MANIFEST):
                return None
            manifest = json.loads(b"".join(self.storage.iter_bytes(self.prefix + MANIFEST)))
            directory.mkdir(parents=True, exist_ok=True)
            for name in FILES:
                self.storage.download_file(self.prefix + name, directory / name)
            store = open_token_store(directory)
        except (StorageError, OSError, ValueError) as exc:
            log(f"tokenized examples: the cached copy could not be read ({exc}); tokenizing")
            return None
        if len(store) != manifest.get("examples"):
            log("tokenized examples: the cached copy is incomplete; tokenizing")
            return None
        return CachedTokens(store, list(manifest.get("log", [])))

    def save(self, directory: Path, store: TokenStore, lines: list[str], *, log: LogFn) -> None:
        """Keep the store written in `directory` and the lines tokenizing it logged. Not cut
        short by a cancel (`uninterruptible`): the manifest goes last either way."""
        manifest = {"examples": len(store), "tokens": store.tokens, "log": lines}
        try:
            with uninterruptible():
                for name in FILES:
                    self.storage.put_file(self.prefix + name, directory / name)
                self.storage.put_bytes(self.prefix + MANIFEST, json.dumps(manifest).encode())
        except StorageError as exc:
            log(f"tokenized examples: not kept for later attempts ({exc})")
            return
        log(f"tokenized examples kept for later attempts and jobs on this dataset "
            f"({store.tokens} tokens)")
