"""The base model a worker keeps between jobs, so that the next job on the same base skips
loading it (and, for QLoRA, quantizing it again).

One model at most, in this process (a Celery solo-pool worker runs one job at a time). A job
gets the base through `BaseModelCache.use()`, wraps it with its own fresh LoRA adapter, trains,
and on leaving the block the base is put back as loaded (`base_state.restore_base`); if that
cannot be proven, it is dropped instead of kept.

The key (`BaseKey`) holds everything that decides what loading would return: the resolved
source and its current revision, the load options (dtype, 4-bit config, attention, device
map) and a digest of the hub token used. A private hub model loaded with one tenant's token
is therefore never handed to a job with no token or another one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.schema import PretrainedModelConfig
from worker.pipeline.base_state import BaseSnapshot, restore_base, snapshot_base
from worker.pipeline.model import (
    CpuBf16,
    ModelSource,
    base_model_options,
    load_base_model_from,
    opened_model_source,
)
from worker.pipeline.report import LogFn, no_log

worker_log = logging.getLogger("tunery.worker")


@dataclass(frozen=True)
class BaseKey:
    """What decides the loaded base: two jobs with equal keys get the same model."""

    source: str
    """The resolved local directory or the hub id."""
    revision: str
    """Local: a digest of the directory's file names, sizes and modification times, as
    opened for loading.
    Hub: the commit the hub (or, offline, the local hub cache) resolves the id to."""
    options: str
    """`base_model_options` as canonical JSON."""
    token_sha256: str | None
    """Who may see the weights; a digest, never the token."""


def base_key(
    model_path: str,
    config: PretrainedModelConfig,
    *,
    allowed_local_dirs: Iterable[Path],
    token: str | None = None,
    cache_dir: Path | None = None,
    cpu_bf16: CpuBf16 = "auto",
) -> BaseKey | None:
    """The key of the base `load_base_model` would load now; None when its revision cannot be
    told (hub unreachable or refusing the token): then the base is loaded, not reused."""
    with opened_model_source(model_path, allowed_local_dirs) as source:
        return source_key(source, config, token=token, cache_dir=cache_dir, cpu_bf16=cpu_bf16)


def source_key(
    source: ModelSource,
    config: PretrainedModelConfig,
    *,
    token: str | None = None,
    cache_dir: Path | None = None,
    cpu_bf16: CpuBf16 = "auto",
) -> BaseKey | None:
    """`base_key` of a source `opened_model_source` holds open. A local directory's revision
    comes from the very files opened (and then loaded), not from a second look by path."""
    if source.local_revision is not None:
        revision: str | None = hashlib.sha256(source.local_revision.encode()).hexdigest()
    else:
        revision = hub_revision(source.source, token, cache_dir)
    if revision is None:
        return None
    return BaseKey(
        source=source.source,
        revision=revision,
        options=_canonical_options(base_model_options(config, cpu_bf16)),
        token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None,
    )


def hub_revision(repo_id: str, token: str | None, cache_dir: Path | None = None) -> str | None:
    """The commit `repo_id` resolves to now, or None if it cannot be told.

    The same request `from_pretrained` starts with (config.json through the hub cache): online
    it asks the hub, with the job's token, so a revoked token or a new commit is noticed;
    offline (HF_HUB_OFFLINE) it reads the local cache's ref.
    """
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id, "config.json", token=token,
                                    cache_dir=None if cache_dir is None else str(cache_dir)))
    except Exception:  # no access, no network, no such repo: loading will say which
        return None
    # <cache>/models--owner--name/snapshots/<commit>/config.json
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def _canonical_options(options: dict[str, Any]) -> str:
    def plain(value: Any) -> Any:
        if hasattr(value, "to_dict"):
            return {k: plain(v) for k, v in sorted(value.to_dict().items())}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in sorted(value.items())}
        return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)

    return json.dumps(plain(options), sort_keys=True)


@dataclass
class _Kept:
    key: BaseKey
    model: Any
    snapshot: BaseSnapshot
    jobs: int = 0


class BaseModelCache:
    """Keeps the last base model of this process for the next job on the same base.

    With `enabled=False` every job loads its base and nothing is kept: the same code path, so
    turning the cache off (`TUNERY_BASE_MODEL_CACHE=false`) changes nothing else.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._kept: _Kept | None = None
        self._in_use = False

    @property
    def key(self) -> BaseKey | None:
        """The key of the base kept now, if any."""
        return self._kept.key if self._kept else None

    @contextmanager
    def use(
        self,
        model_path: str,
        config: PretrainedModelConfig,
        *,
        allowed_local_dirs: Iterable[Path],
        token: str | None = None,
        cache_dir: Path | None = None,
        cpu_bf16: CpuBf16 = "auto",
        log: LogFn = no_log,
    ) -> Iterator[Any]:
        """The base model for one job, as `load_base_model` would return it, for the duration
        of the block. The job may wrap and train it; on leaving, it is reset or dropped.

        A full fine-tune (`config.use_lora` false) trains the base itself: it is always
        loaded (the kept base dropped first, to free its memory) and never kept."""
        keep = config.use_lora
        with opened_model_source(model_path, allowed_local_dirs) as source:
            key = source_key(source, config, token=token, cache_dir=cache_dir,
                             cpu_bf16=cpu_bf16) if self.enabled and keep else None

            def load() -> Any:
                return load_base_model_from(source, model_path, config, token=token,
                                            cache_dir=cache_dir, cpu_bf16=cpu_bf16, log=log)

            with self.checkout(key, load, log=log, keep=keep) as model:
                yield model

    @contextmanager
    def checkout(
        self, key: BaseKey | None, load: Callable[[], Any], *, log: LogFn = no_log,
        keep: bool = True,
    ) -> Iterator[Any]:
        """`use()` once the key is known: the kept base if its key is `key`, else `load()`
        after dropping the kept one. `key` None: load, and keep nothing (`keep` False: because
        the job changes the base's weights)."""
        if self._in_use:
            raise RuntimeError("the base model cache is already lent to a running job")
        # Set inside the try: a stop signal (worker.pipeline.interrupts) may raise between any
        # two bytecodes here, and must never leave the cache marked as lent.
        try:
            self._in_use = True
            kept = self._take(key, load, log, keep)
            try:
                yield kept.model if isinstance(kept, _Kept) else kept
            finally:
                if isinstance(kept, _Kept):
                    self._give_back(kept, log)
        finally:
            self._in_use = False

    def clear(self) -> None:
        """Drop the kept base and free its memory."""
        if self._kept is not None:
            self._kept = None
            release_memory()

    def _take(self, key: BaseKey | None, load: Callable[[], Any], log: LogFn,
              keep: bool = True) -> _Kept | Any:
        if self._kept is not None and key is not None and self._kept.key == key:
            kept, self._kept = self._kept, None
            kept.jobs += 1
            log(f"base model reused from this worker's cache, not loaded (job {kept.jobs + 1} "
                "on it)")
            return kept
        if self._kept is not None:
            # Before loading: two base models at once may not fit in the GPU's memory.
            worker_log.info("base model cache: dropping %s for another base",
                            self._kept.key.source)
            self.clear()
        if not self.enabled:
            return load()
        if key is None:
            why = "its hub revision is unknown" if keep else "full fine-tuning changes it"
            log(f"base model loaded; not kept for later jobs ({why})")
            return load()
        model = load()
        log("base model loaded into this worker's cache (empty before)")
        return _Kept(key=key, model=model, snapshot=snapshot_base(model))

    def _give_back(self, kept: _Kept, log: LogFn) -> None:
        try:
            differences = restore_base(kept.model, kept.snapshot)
        except Exception as exc:  # a reset that fails proves nothing: drop the base
            differences = [f"the reset failed: {type(exc).__name__}: {exc}"]
        if differences:
            worker_log.warning(
                "base model cache: %s not kept, it differs from the loaded base after the job: "
                "%s", kept.key.source, "; ".join(differences[:5]),
            )
            log("base model not kept for the next job: the job changed it beyond the LoRA "
                "adapter")
            return
        self._kept = kept


def release_memory() -> None:
    """Collect what was dropped and give the freed GPU memory back to the device."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
