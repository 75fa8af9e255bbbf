"""The vLLM resolver's storage side (deploy/vllm, `tunery_vllm_resolver.adapter_cache`) against
a real S3 endpoint (moto's server over HTTP): names to cached adapter folders, atomic
downloads, base checks, and a bounded cache whose eviction never deletes a folder a live
process handed to vLLM, also when that process is another one.

vLLM itself needs CUDA and cannot be installed here: its class (`tunery_vllm_resolver.plugin`)
is checked on a GPU by bench/gpu/vllm_serve.sh; here it is only checked to be what the plugin
entry point names, over a stand-in for vLLM (tests/deploy/test_vllm_plugin.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from tunery_vllm_resolver.adapter_cache import (
    PIN_FILE,
    AdapterCache,
    AdapterTooLarge,
    ResolverConfig,
    download_adapter,
    evict_least_recently_used,
)

from shared.served_models import adapter_keys, adapter_name
from shared.storage import S3Storage, StorageError

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
WEIGHTS_BYTES = 40_000
ROOT = Path(__file__).resolve().parents[2]


def put_adapter(store: S3Storage, *, base: str = BASE, peft_type: str = "LORA") -> str:
    """A completed job's adapter in storage, as the worker publishes it; returns the job id."""
    job_id = str(uuid.uuid4())
    keys = adapter_keys(job_id)
    store.put_bytes(keys["adapter_model.safetensors"], os.urandom(WEIGHTS_BYTES))
    config = {"peft_type": peft_type, "base_model_name_or_path": base, "r": 8}
    store.put_bytes(keys["adapter_config.json"], json.dumps(config).encode())
    return job_id


def cache_dirs(cache_dir: Path) -> set[str]:
    return {path.name for path in cache_dir.iterdir()} if cache_dir.exists() else set()


def test_an_adapter_name_resolves_to_a_folder_with_the_job_s_adapter(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    job_id = put_adapter(s3_storage)
    cache = AdapterCache(s3_storage, tmp_path / "cache", 10 * WEIGHTS_BYTES)

    entry = cache.resolve(adapter_name(job_id), {BASE})

    assert entry == tmp_path / "cache" / adapter_name(job_id)
    for file_name, key in adapter_keys(job_id).items():
        assert (entry / file_name).read_bytes() == b"".join(s3_storage.iter_bytes(key))
    # Tenants' adapters: private to the vLLM user, and nothing half-written left beside them.
    assert (tmp_path / "cache").stat().st_mode & 0o077 == 0
    assert cache_dirs(tmp_path / "cache") == {adapter_name(job_id)}
    cache.close()


@pytest.mark.parametrize(
    "name",
    ["tunery-job-../../etc", "tunery-job-", "../tunery-job-abc", "tunery-job-abc/../x",
     "tunery-job-ABC", "HuggingFaceTB/SmolLM2-135M-Instruct", "/tmp/tunery-job-1", ""],
)
def test_a_name_that_is_no_adapter_name_resolves_to_nothing_and_touches_nothing(
    tmp_path: Path, name: str
) -> None:
    # A store that fails every call: the name must be refused before storage is asked.
    unreachable = S3Storage("no-bucket", endpoint_url="http://127.0.0.1:9", access_key_id="x",
                            secret_access_key="y")
    cache = AdapterCache(unreachable, tmp_path / "cache", 10 * WEIGHTS_BYTES)

    assert cache.resolve(name, {BASE}) is None
    assert not (tmp_path / "cache").exists()


def test_a_job_without_an_adapter_resolves_to_nothing_and_leaves_no_folder(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    half = str(uuid.uuid4())  # the config was written, the weights never were
    s3_storage.put_bytes(adapter_keys(half)["adapter_config.json"], b'{"peft_type": "LORA"}')
    cache = AdapterCache(s3_storage, tmp_path / "cache", 10 * WEIGHTS_BYTES)

    assert cache.resolve(adapter_name(str(uuid.uuid4())), {BASE}) is None
    assert cache.resolve(adapter_name(half), {BASE}) is None
    assert cache_dirs(tmp_path / "cache") == set()


def test_an_adapter_of_another_base_or_not_lora_is_not_served(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    other_base = put_adapter(s3_storage, base="meta-llama/Llama-3.2-1B")
    not_lora = put_adapter(s3_storage, peft_type="PREFIX_TUNING")
    cache = AdapterCache(s3_storage, tmp_path / "cache", 10 * WEIGHTS_BYTES)

    assert cache.resolve(adapter_name(other_base), {BASE}) is None
    assert cache.resolve(adapter_name(not_lora), {BASE}) is None
    # Served under an alias: `vllm serve /models/smollm2` with TUNERY_VLLM_BASE_MODEL set.
    assert cache.resolve(adapter_name(other_base), {"/models/x", "meta-llama/Llama-3.2-1B"})


def test_an_unreachable_store_is_an_error_not_a_missing_adapter(tmp_path: Path) -> None:
    unreachable = S3Storage("no-bucket", endpoint_url="http://127.0.0.1:9", access_key_id="x",
                            secret_access_key="y")
    cache = AdapterCache(unreachable, tmp_path / "cache", 10 * WEIGHTS_BYTES)

    with pytest.raises(StorageError):
        cache.resolve(adapter_name(str(uuid.uuid4())), {BASE})


def test_an_adapter_larger_than_the_whole_cache_is_refused_before_download(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    job_id = put_adapter(s3_storage)

    with pytest.raises(AdapterTooLarge, match="TUNERY_VLLM_CACHE_MAX_MB"):
        download_adapter(s3_storage, job_id, tmp_path / "cache", WEIGHTS_BYTES // 2)
    assert cache_dirs(tmp_path / "cache") == set()


def test_concurrent_requests_for_one_adapter_download_it_once(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    job_id = put_adapter(s3_storage)
    caches = [AdapterCache(s3_storage, tmp_path / "cache", 10 * WEIGHTS_BYTES) for _ in range(2)]
    results: list[Path | None] = []

    threads = [
        threading.Thread(target=lambda c=cache: results.append(c.resolve(adapter_name(job_id),
                                                                          {BASE})))
        for cache in caches for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == [tmp_path / "cache" / adapter_name(job_id)] * 6
    assert cache_dirs(tmp_path / "cache") == {adapter_name(job_id)}
    for cache in caches:
        cache.close()


def test_eviction_deletes_the_least_recently_used_adapters_no_process_holds(
    s3_storage: S3Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jobs = [put_adapter(s3_storage) for _ in range(4)]
    names = [adapter_name(job) for job in jobs]
    room_for_two = int(2.5 * WEIGHTS_BYTES)
    earlier_run = AdapterCache(s3_storage, tmp_path / "cache", room_for_two)
    for name in names[:3]:
        assert earlier_run.resolve(name, {BASE})
        time.sleep(0.01)  # distinct mtimes: the order of use is the order of eviction
    # Held by a running server, nothing may go, even over the bound; the log says so.
    assert cache_dirs(tmp_path / "cache") == set(names[:3])
    assert "in use by a running vLLM server" in caplog.text
    assert earlier_run.resolve(names[0], {BASE})  # used again: now the most recent
    earlier_run.close()  # that server stopped

    this_run = AdapterCache(s3_storage, tmp_path / "cache", room_for_two)
    assert this_run.resolve(names[3], {BASE})

    assert cache_dirs(tmp_path / "cache") == {names[0], names[3]}
    this_run.close()


def test_an_adapter_another_live_process_holds_survives_eviction(
    s3_storage: S3Storage, s3_endpoint_url: str, s3_credentials: dict[str, str], tmp_path: Path
) -> None:
    held, *others = [adapter_name(put_adapter(s3_storage)) for _ in range(3)]
    cache_dir = tmp_path / "cache"
    holder_code = f"""
import sys
from pathlib import Path
from shared.storage import S3Storage
from tunery_vllm_resolver.adapter_cache import AdapterCache
store = S3Storage({s3_storage.bucket!r}, {s3_storage.prefix!r}, endpoint_url={s3_endpoint_url!r},
                  access_key_id={s3_credentials["access_key_id"]!r},
                  secret_access_key={s3_credentials["secret_access_key"]!r})
cache = AdapterCache(store, Path({str(cache_dir)!r}), {10 * WEIGHTS_BYTES})
print(cache.resolve({held!r}, {{{BASE!r}}}), flush=True)
sys.stdin.read()
"""
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == str(cache_dir / held)
        this_run = AdapterCache(s3_storage, cache_dir, 10 * WEIGHTS_BYTES)
        for name in others:
            time.sleep(0.01)  # distinct mtimes: the held adapter is the least recently used
            assert this_run.resolve(name, {BASE})
        this_run.close()

        # Room for one: the held adapter stays although it is the oldest; the others go.
        assert evict_least_recently_used(cache_dir, WEIGHTS_BYTES + WEIGHTS_BYTES // 2) == others
        assert cache_dirs(cache_dir) == {held}
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    # Its process gone, nothing holds it any more.
    assert evict_least_recently_used(cache_dir, WEIGHTS_BYTES // 2) == [held]


def test_an_entry_is_complete_or_absent(s3_storage: S3Storage, tmp_path: Path) -> None:
    job_id = put_adapter(s3_storage)
    cache_dir = tmp_path / "cache"
    entry = download_adapter(s3_storage, job_id, cache_dir, 10 * WEIGHTS_BYTES)
    # Downloading again reuses the entry; a left-over download folder of a dead process
    # (older than a day) is cleared by the next eviction pass.
    assert download_adapter(s3_storage, job_id, cache_dir, 10 * WEIGHTS_BYTES) == entry
    stale = cache_dir / ".partial-dead"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * 86400,) * 2)

    assert evict_least_recently_used(cache_dir, 10 * WEIGHTS_BYTES) == []
    assert cache_dirs(cache_dir) == {adapter_name(job_id)}
    assert sorted(path.name for path in entry.iterdir()) == sorted(
        [PIN_FILE, *adapter_keys(job_id)]
    )


def test_config_comes_from_the_environment_with_errors_naming_the_variable() -> None:
    storage = {"TUNERY_STORAGE_URL": "s3://bucket/prefix"}
    config = ResolverConfig.from_env({**storage, "TUNERY_VLLM_CACHE_DIR": "/var/cache/lora",
                                      "TUNERY_VLLM_CACHE_MAX_MB": "512",
                                      "TUNERY_VLLM_BASE_MODEL": BASE})
    assert config == ResolverConfig(Path("/var/cache/lora"), 512 << 20, BASE)
    assert ResolverConfig.from_env(storage).base_model is None

    with pytest.raises(ValueError, match="TUNERY_STORAGE_URL"):
        ResolverConfig.from_env({})
    for bad in ("0", "-5", "lots", "1.5"):
        with pytest.raises(ValueError, match="TUNERY_VLLM_CACHE_MAX_MB"):
            ResolverConfig.from_env({**storage, "TUNERY_VLLM_CACHE_MAX_MB": bad})
    with pytest.raises(ValueError, match="TUNERY_VLLM_CACHE_DIR"):
        ResolverConfig.from_env({**storage, "TUNERY_VLLM_CACHE_DIR": "relative/dir"})
