"""The vLLM side: a `LoRAResolver` over `adapter_cache`, registered by vLLM's plugin loader
(entry point `tunery_lora_resolver` in the `vllm.general_plugins` group).

vLLM consults resolvers only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, for a requested
model that is neither its base nor an adapter it already loaded, and it loads the plugin in
each of its processes: `register` only reads the environment, the storage client is built on
the first request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from tunery_vllm_resolver.adapter_cache import AdapterCache, ResolverConfig, open_cache

log = logging.getLogger("tunery.vllm")

RESOLVER_NAME = "Tunery Resolver"
# vLLM gives a resolved adapter an id from its own counter, which starts at 1; these start far
# above it, so that a vLLM that kept the resolver's id would still never see two adapters
# under one id.
_lora_ids = itertools.count(1 << 30)


class TuneryLoRAResolver(LoRAResolver):
    """Finds `tunery-job-<job id>` in Tunery's storage; see `adapter_cache`."""

    def __init__(self, config: ResolverConfig) -> None:
        self.config = config
        self._cache: AdapterCache | None = None
        self._cache_lock = threading.Lock()

    def _adapter_cache(self) -> AdapterCache:
        with self._cache_lock:
            if self._cache is None:
                self._cache = open_cache(self.config)
            return self._cache

    def _resolve_path(self, base_model_name: str, lora_name: str) -> str | None:
        served = {base_model_name}
        if self.config.base_model:
            served.add(self.config.base_model)
        path = self._adapter_cache().resolve(lora_name, served)
        return None if path is None else str(path)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # A download must not stall the server's event loop, which serves every other request.
        path = await asyncio.to_thread(self._resolve_path, base_model_name, lora_name)
        if path is None:
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=next(_lora_ids), lora_path=path)


def register() -> None:
    """vLLM's plugin hook. A misconfigured resolver stops vLLM from starting, with the
    variable named, rather than answering every adapter request with 404."""
    config = ResolverConfig.from_env(os.environ)
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() not in ("1", "true"):
        log.warning("VLLM_ALLOW_RUNTIME_LORA_UPDATING is not True: vLLM will not ask the "
                    "Tunery resolver for adapters")
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, TuneryLoRAResolver(config))
