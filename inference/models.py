"""The models the engine holds: base models (at most `max_bases`, least recently used
unloaded first) and LoRA adapters on them by peft name (at most `max_adapters` and
`adapter_memory_mb` in all, least recently used unloaded first, never one a running batch
uses).

A request names a base as jobs name it (a hub id or an allowed local directory), loaded exactly
as the worker loads it for training but never quantized, or an adapter `tunery-job-<id>`
(`shared.served_models`), whose two files are read from Tunery's storage and whose base is the
one its `adapter_config.json` names. Only the engine's thread calls this module.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.protocol import RequestRefused, model_not_found
from shared import served_models
from shared.schema import PretrainedModelConfig
from shared.settings import Settings
from shared.storage import ObjectNotFound, Storage, StorageError, storage_from_settings
from worker.pipeline.errors import PipelineError
from worker.pipeline.model import load_base_model, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# peft's own name for "no adapter" in a mixed batch.
NO_ADAPTER = "__base__"


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolves to: a base (its resolved source) and maybe an
    adapter on it."""

    base: str
    adapter: str | None


@dataclass
class LoadedBase:
    """A base model ready to generate: `model` is the plain model until its first adapter,
    then the `PeftModel` around it (which then also answers for the plain base, by
    `NO_ADAPTER`)."""

    source: str
    model: Any
    tokenizer: Any
    context_len: int
    eos_ids: frozenset[int]
    adapters: set[str] = field(default_factory=set)

    @property
    def has_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


class ModelStore:
    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        self._settings = settings
        self._limits = settings.inference
        self._storage = storage if storage is not None else storage_from_settings(settings)
        self._allowed = list(settings.sources.allowed_local_dirs)
        self._bases: OrderedDict[str, LoadedBase] = OrderedDict()
        # adapter name -> (its base, bytes of its tensors), least recently used first.
        self._adapters: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def resolve(self, name: str) -> Target:
        """The base and adapter `name` stands for; `RequestRefused` 404 when there is none."""
        job_id = served_models.job_of_adapter(name)
        if job_id is None:
            return Target(self._resolve_base(name), None)
        if name in self._adapters:
            return Target(self._adapters[name][0], name)
        config = self._read_adapter_config(name, job_id)
        base = config.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise model_not_found(name, "its adapter_config.json names no base model")
        return Target(self._resolve_base(base), name)

    def base(self, source: str, keep: Collection[str] = ()) -> LoadedBase:
        """The loaded base `source` (from `resolve`), loading it first if needed and
        unloading the least recently used others beyond `max_bases`, except those in `keep`."""
        loaded = self._bases.get(source)
        if loaded is not None:
            self._bases.move_to_end(source)
            return loaded
        loaded = self._load_base(source)
        self._bases[source] = loaded
        for other in list(self._bases):
            if len(self._bases) <= self._limits.max_bases:
                break
            if other != source and other not in keep:
                self._unload_base(other)
        return loaded

    def prepare_adapters(self, base: LoadedBase, names: Collection[str]) -> None:
        """Load the adapters `names` of `base` that are not loaded, mark them all most
        recently used, and unload the least recently used others to stay within
        `max_adapters` and `adapter_memory_mb`. The adapters in `names` are never unloaded
        here: a batch about to run uses them."""
        for name in names:
            if name not in self._adapters:
                self._load_adapter(base, name)
            self._adapters.move_to_end(name)
        budget = self._limits.adapter_memory_mb * 1024 * 1024
        for victim in list(self._adapters):
            if len(self._adapters) <= self._limits.max_adapters and \
                    self.adapter_bytes() <= budget:
                break
            if victim not in names:
                self._unload_adapter(victim)
        if self.adapter_bytes() > budget:
            log.warning("adapters in use take %d bytes, over adapter_memory_mb",
                        self.adapter_bytes())

    def loaded_adapters(self) -> list[str]:
        """Adapter names, least recently used first."""
        return list(self._adapters)

    def adapter_base(self, name: str) -> str:
        return self._adapters[name][0]

    def loaded_bases(self) -> list[str]:
        return list(self._bases)

    def adapter_bytes(self) -> int:
        return sum(size for _, size in self._adapters.values())

    def _resolve_base(self, name: str) -> str:
        try:
            return resolve_model_path(name, self._allowed)
        except PipelineError as exc:
            raise model_not_found(name, str(exc)) from None

    def _read_adapter_config(self, name: str, job_id: str) -> dict[str, Any]:
        key = served_models.adapter_keys(job_id)[ADAPTER_CONFIG]
        try:
            raw = b"".join(self._storage.iter_bytes(key))
        except ObjectNotFound:
            raise model_not_found(name, "no such adapter") from None
        except StorageError as exc:
            raise RequestRefused(503, f"storage is unavailable: {exc}", code="storage_error",
                                 type_="service_unavailable") from None
        try:
            config = json.loads(raw)
        except ValueError:
            raise model_not_found(name, "its adapter_config.json is not JSON") from None
        if not isinstance(config, dict):
            raise model_not_found(name, "its adapter_config.json is not a JSON object")
        return config

    def _load_base(self, source: str) -> LoadedBase:
        # Full precision or bf16 as the worker trains (`compute_dtype`), never 4-bit: an
        # adapter trained with QLoRA applies to the unquantized base as well.
        config = PretrainedModelConfig(model_path=source, use_quantization=False,
                                       use_gradient_checkpointing=False)
        try:
            tokenizer = load_tokenizer(source, allowed_local_dirs=self._allowed)
            model = load_base_model(source, config, allowed_local_dirs=self._allowed,
                                    cpu_bf16=self._settings.training.cpu_bf16)
        except PipelineError as exc:
            raise model_not_found(source, str(exc)) from None
        model.eval()
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        context = getattr(model.config, "max_position_embeddings", None) \
            or tokenizer.model_max_length
        log.info("loaded base %s (%s)", source, model.dtype)
        return LoadedBase(source, model, tokenizer, int(context), frozenset(eos_ids))

    def _unload_base(self, source: str) -> None:
        loaded = self._bases.pop(source)
        for name in list(loaded.adapters):
            self._adapters.pop(name, None)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("unloaded base %s", source)

    def _load_adapter(self, base: LoadedBase, name: str) -> None:
        from peft import PeftModel

        job_id = served_models.job_of_adapter(name)
        assert job_id is not None, "resolve() accepted only adapter names"
        with tempfile.TemporaryDirectory(prefix="tunery-adapter-") as tmp:
            try:
                for file_name, key in served_models.adapter_keys(job_id).items():
                    self._storage.download_file(key, Path(tmp) / file_name)
            except ObjectNotFound:
                raise model_not_found(name, "its adapter files are missing") from None
            except StorageError as exc:
                raise RequestRefused(503, f"storage is unavailable: {exc}",
                                     code="storage_error", type_="service_unavailable") from None
            try:
                if base.has_peft:
                    base.model.load_adapter(tmp, adapter_name=name)
                else:
                    base.model = PeftModel.from_pretrained(base.model, tmp, adapter_name=name)
                    base.model.eval()
            except Exception as exc:  # a file peft cannot apply to this base, in any way
                raise model_not_found(
                    name, f"the adapter does not load on its base: {type(exc).__name__}: {exc}"
                ) from None
        size = sum(p.numel() * p.element_size() for key, p in base.model.named_parameters()
                   if f".{name}." in key)
        base.adapters.add(name)
        self._adapters[name] = (base.source, size)
        log.info("loaded adapter %s (%d bytes) on %s", name, size, base.source)

    def _unload_adapter(self, name: str) -> None:
        source, _ = self._adapters.pop(name)
        base = self._bases.get(source)
        if base is not None and name in base.adapters:
            base.adapters.discard(name)
            if base.adapters:
                base.model.delete_adapter(name)
            else:
                # peft keeps no model without an adapter: back to the plain base.
                base.model = base.model.unload()
        log.info("unloaded adapter %s", name)
