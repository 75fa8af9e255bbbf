"""The vLLM plugin as vLLM loads it: found through its `vllm.general_plugins` entry point,
registered, and asked for adapters, in a process of its own.

vLLM needs CUDA and cannot be installed here, so the process gets a stand-in for the three
names the plugin imports (`LoRARequest`, `LoRAResolver`, `LoRAResolverRegistry`), shaped as
vLLM defines them; bench/gpu/vllm_serve.sh runs the plugin inside a real `vllm serve`. The
storage is a local directory (`file://`), as Tunery's settings name one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from shared.served_models import adapter_keys, adapter_name
from shared.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"

VLLM_STAND_IN = {
    "vllm/__init__.py": "",
    "vllm/lora/__init__.py": "",
    "vllm/lora/request.py": '''
from dataclasses import dataclass

@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
''',
    "vllm/lora/resolver.py": '''
from abc import ABC, abstractmethod

class LoRAResolver(ABC):
    @abstractmethod
    async def resolve_lora(self, base_model_name, lora_name): ...

class _Registry:
    def __init__(self):
        self.resolvers = {}
    def register_resolver(self, name, resolver):
        self.resolvers[name] = resolver
    def get_supported_resolvers(self):
        return self.resolvers.keys()
    def get_resolver(self, name):
        return self.resolvers[name]

LoRAResolverRegistry = _Registry()
''',
}

# What vLLM's plugin loader and OpenAIServingModels.resolve_lora do, reduced to the calls.
SERVE = """
import asyncio, json, sys
from importlib.metadata import entry_points
from vllm.lora.resolver import LoRAResolverRegistry

for plugin in entry_points(group="vllm.general_plugins"):
    if plugin.name == "tunery_lora_resolver":
        plugin.load()()
resolvers = [LoRAResolverRegistry.get_resolver(name)
             for name in LoRAResolverRegistry.get_supported_resolvers()]

async def ask(base, name):
    for resolver in resolvers:
        found = await resolver.resolve_lora(base, name)
        if found is not None:
            return {"name": found.lora_name, "id": found.lora_int_id, "path": found.lora_path}
    return None

names = json.loads(sys.argv[1])
answers = [asyncio.run(ask(sys.argv[2], name)) for name in names]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {
    "sqlalchemy", "alembic", "celery", "kombu", "redis", "psycopg", "httpx", "fastapi",
    "torch", "transformers", "peft", "api", "worker", "cli"})
print(json.dumps({"resolvers": len(resolvers), "answers": answers, "heavy": heavy}))
"""


def put_adapter(store: LocalStorage, base: str) -> str:
    job_id = str(uuid.uuid4())
    keys = adapter_keys(job_id)
    store.put_bytes(keys["adapter_model.safetensors"], b"\0" * 1000)
    config = {"peft_type": "LORA", "base_model_name_or_path": base}
    store.put_bytes(keys["adapter_config.json"], json.dumps(config).encode())
    return job_id


def serve(tmp_path: Path, env: dict[str, str], names: list[str], base: str) -> Any:
    stand_in = tmp_path / "stand-in"
    for relative, text in VLLM_STAND_IN.items():
        (stand_in / relative).parent.mkdir(parents=True, exist_ok=True)
        (stand_in / relative).write_text(text)
    result = subprocess.run(
        [sys.executable, "-c", SERVE, json.dumps(names), base],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(stand_in), **env},
    )
    return result


def test_vllm_finds_the_plugin_by_its_entry_point_and_resolves_tunery_adapters(
    tmp_path: Path,
) -> None:
    store = LocalStorage(tmp_path / "storage")
    ours, other_base = put_adapter(store, BASE), put_adapter(store, "meta-llama/Llama-3.2-1B")
    env = {
        "TUNERY_STORAGE_URL": store.root.as_uri(),
        "TUNERY_VLLM_CACHE_DIR": str(tmp_path / "cache"),
        "TUNERY_VLLM_BASE_MODEL": BASE,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    names = [adapter_name(ours), adapter_name(ours), adapter_name(other_base),
             adapter_name(str(uuid.uuid4())), "not-an-adapter"]

    # vLLM passes the base as `vllm serve` was given it: here a local folder.
    result = serve(tmp_path, env, names, "/models/smollm2")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resolvers"] == 1
    first, again, *refused = report["answers"]
    assert first["name"] == adapter_name(ours)
    assert first["path"] == str(tmp_path / "cache" / adapter_name(ours))
    assert (Path(first["path"]) / "adapter_config.json").is_file()
    assert again["id"] != first["id"] > 0  # every LoRARequest gets its own id
    assert refused == [None, None, None]
    # What the Dockerfile's `pip install --no-deps` of Tunery relies on.
    assert report["heavy"] == []


def test_a_misconfigured_plugin_stops_vllm_naming_the_variable(tmp_path: Path) -> None:
    result = serve(tmp_path, {"TUNERY_VLLM_CACHE_MAX_MB": "10"}, [], BASE)

    assert result.returncode != 0
    assert "TUNERY_STORAGE_URL is not set" in result.stderr


def test_the_entry_point_names_the_plugin_s_register_function() -> None:
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert found["tunery_lora_resolver"] == "tunery_vllm_resolver.plugin:register"
