"""Tunery adapters in a local cache directory, for vLLM to load: the storage side of the
resolver, with no vLLM import.

A cache entry is ``<cache_dir>/tunery-job-<job id>/`` holding peft's two adapter files and an
empty `PIN_FILE`. It appears in one `os.rename` of a complete temporary folder, so a reader
never meets half an adapter, and two processes downloading the same adapter leave one entry.

vLLM asks a resolver for a name once per server lifetime and afterwards reloads the adapter
from the returned folder whenever its own GPU and CPU caches dropped it; a folder deleted under
it fails that request inside the engine loop. So every entry a process hands out stays pinned
by a shared `flock` on its `PIN_FILE` until the process exits, and eviction, which takes an
exclusive lock without waiting, deletes only entries that no live process holds: those of
earlier runs and those no longer served. The cache stays within `max_bytes` as long as the
adapters a running server has resolved fit; past that it grows and says so in the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.private_files import make_private_dir
from shared.served_models import adapter_keys, adapter_name, job_of_adapter
from shared.storage import ObjectNotFound, Storage, StorageError
from shared.storage_keys import ADAPTER_FILES

log = logging.getLogger("tunery.vllm")

PIN_FILE = ".pin"
_PARTIAL_PREFIX = ".partial-"
_EVICTING_PREFIX = ".evicting-"
_NAME_LOCK_STRIPES = 64
# A download folder this old was left by a process that died mid-download.
_STALE_PARTIAL_S = 24 * 3600

CACHE_DIR_ENV = "TUNERY_VLLM_CACHE_DIR"
CACHE_MAX_MB_ENV = "TUNERY_VLLM_CACHE_MAX_MB"
BASE_MODEL_ENV = "TUNERY_VLLM_BASE_MODEL"
# Tunery's settings read the storage URL under either name (shared/settings.py).
STORAGE_URL_ENVS = ("TUNERY_STORAGE_URL", "TUNERY_STORAGE__URL")
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "tunery-vllm-adapters"
DEFAULT_CACHE_MAX_MB = 20480


class AdapterTooLarge(StorageError):
    """One adapter alone is larger than the whole cache may be."""


@dataclass(frozen=True)
class ResolverConfig:
    """What the resolver reads from its environment (the storage itself comes from Tunery's
    settings: `TUNERY_STORAGE_URL` and the `TUNERY_S3_*` variables)."""

    cache_dir: Path
    max_bytes: int
    base_model: str | None
    """The base as Tunery jobs name it (their model_path), when `vllm serve` was given it
    under another name, e.g. a local folder; adapters trained on either name are served."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ResolverConfig:
        """Raises ValueError naming the variable when a value is unusable."""
        if not any(environ.get(name) for name in STORAGE_URL_ENVS):
            # Tunery's own default, a folder beside its source, is never where adapters are.
            raise ValueError(
                f"{STORAGE_URL_ENVS[0]} is not set: name Tunery's storage, e.g. "
                "s3://bucket/prefix with TUNERY_S3_ENDPOINT_URL and the TUNERY_S3_* keys"
            )
        raw_max = environ.get(CACHE_MAX_MB_ENV, "").strip() or str(DEFAULT_CACHE_MAX_MB)
        try:
            max_mb = int(raw_max)
        except ValueError:
            max_mb = 0
        if max_mb < 1:
            raise ValueError(
                f"{CACHE_MAX_MB_ENV} must be a whole number of MB >= 1, got {raw_max!r}"
            )
        raw_dir = environ.get(CACHE_DIR_ENV, "").strip()
        cache_dir = Path(raw_dir) if raw_dir else DEFAULT_CACHE_DIR
        if not cache_dir.is_absolute():
            raise ValueError(f"{CACHE_DIR_ENV} must be an absolute path, got {raw_dir!r}")
        base_model = environ.get(BASE_MODEL_ENV, "").strip() or None
        return cls(cache_dir, max_mb * 1024 * 1024, base_model)


def download_adapter(storage: Storage, job_id: str, cache_dir: Path, max_bytes: int) -> Path:
    """The cache entry of the adapter job `job_id` exported, downloaded unless already there.

    Raises ObjectNotFound when the job has no adapter in storage (unknown, unfinished or
    deleted), AdapterTooLarge when it could never fit the cache, StorageError when storage
    fails. Nothing is left behind on failure.
    """
    entry = cache_dir / adapter_name(job_id)
    if _is_complete(entry):
        return entry
    keys = adapter_keys(job_id)
    size = sum(storage.size(key) for key in keys.values())
    if size > max_bytes:
        raise AdapterTooLarge(
            f"adapter {adapter_name(job_id)} is {size} bytes, more than the whole cache "
            f"({max_bytes} bytes, {CACHE_MAX_MB_ENV})"
        )
    make_private_dir(cache_dir)
    # Room first, so the download itself stays within the bound.
    evict_least_recently_used(cache_dir, max_bytes - size, quiet=True)
    partial = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=cache_dir))
    try:
        for file_name, key in keys.items():
            storage.download_file(key, partial / file_name)
        (partial / PIN_FILE).touch()
        try:
            os.rename(partial, entry)
        except OSError:
            # Renaming onto a non-empty folder fails: another process finished first.
            if not _is_complete(entry):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return entry


def _is_complete(entry: Path) -> bool:
    return all((entry / name).is_file() for name in (*ADAPTER_FILES, PIN_FILE))


def adapter_base_model(entry: Path) -> str | None:
    """The base model a cached LoRA adapter was trained on, as its `adapter_config.json`
    names it; None when the config is unreadable or describes no LoRA adapter."""
    try:
        config = json.loads((entry / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        return None
    base = config.get("base_model_name_or_path")
    return base if isinstance(base, str) else None


def pin_entry(entry: Path) -> int | None:
    """A file descriptor holding a shared lock on `entry` (eviction skips it until the
    descriptor is closed), or None when the entry was evicted meanwhile."""
    try:
        fd = os.open(entry / PIN_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # Waits only while an evictor holds the entry, that is while it renames it away.
        fcntl.flock(fd, fcntl.LOCK_SH)
        current = os.stat(entry / PIN_FILE)
        held = os.fstat(fd)
        if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
    except FileNotFoundError:
        pass
    os.close(fd)
    return None


def entry_size(entry: Path) -> int:
    return sum(path.stat().st_size for path in entry.iterdir() if path.is_file())


def evict_least_recently_used(cache_dir: Path, max_bytes: int, *, quiet: bool = False) -> list[str]:
    """Delete the least recently used unpinned entries until the cache holds at most
    `max_bytes`; return the names deleted. Also clears what dead processes left behind.
    Logs a warning when pinned entries alone hold more, unless `quiet`."""
    entries: list[tuple[float, int, Path]] = []
    now = time.time()
    for path in cache_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if path.name.startswith(_EVICTING_PREFIX) or (
                path.name.startswith(_PARTIAL_PREFIX)
                and now - path.stat().st_mtime > _STALE_PARTIAL_S
            ):
                shutil.rmtree(path, ignore_errors=True)
            elif job_of_adapter(path.name) is not None and path.is_dir():
                entries.append((path.stat().st_mtime, entry_size(path), path))
    total = sum(size for _, size, _ in entries)
    evicted: list[str] = []
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if _delete_unpinned(cache_dir, path):
            total -= size
            evicted.append(path.name)
    if total > max_bytes and not quiet:
        log.warning(
            "adapter cache %s holds %.1f MB, over its %.1f MB: every entry left is in use by "
            "a running vLLM server, which keeps each adapter it resolved until it restarts",
            cache_dir, total / 2**20, max_bytes / 2**20,
        )
    return evicted


def _delete_unpinned(cache_dir: Path, entry: Path) -> bool:
    try:
        fd = os.open(entry / PIN_FILE, os.O_RDONLY)
    except FileNotFoundError:
        fd = None  # not one of ours, or already being evicted; renaming below decides
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        doomed = cache_dir / f"{_EVICTING_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(entry, doomed)
        except FileNotFoundError:
            return False  # another evictor took it
    finally:
        if fd is not None:
            os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def open_cache(config: ResolverConfig) -> AdapterCache:
    """The cache over Tunery's storage as its settings name it in this process's environment."""
    from shared.settings import Settings
    from shared.storage import storage_from_settings

    # Settings(), not get_settings(): the latter prepares an embedded data dir.
    return AdapterCache(storage_from_settings(Settings()), config.cache_dir, config.max_bytes)


class AdapterCache:
    """Resolves adapter names to cached, pinned folders for one process.

    Thread-safe: concurrent calls for one name wait for a single download.
    """

    def __init__(self, storage: Storage, cache_dir: Path, max_bytes: int) -> None:
        self.storage = storage
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        # One lock per name would grow with every name ever asked; a fixed stripe of locks
        # still gives each name one lock, shared now and then with an unrelated name.
        self._name_locks = [threading.Lock() for _ in range(_NAME_LOCK_STRIPES)]

    def resolve(self, name: str, served_bases: Collection[str]) -> Path | None:
        """The local folder of adapter `name`, pinned for this process's lifetime.

        None when `name` is no Tunery adapter name, the job has no adapter in storage, or the
        adapter was trained on a base not in `served_bases`. Raises StorageError when storage
        fails or the adapter could never fit the cache.
        """
        job_id = job_of_adapter(name)
        if job_id is None:
            return None
        with self._name_locks[hash(name) % _NAME_LOCK_STRIPES]:
            entry = self.cache_dir / name
            if name in self._pins:
                return self._touch(entry)
            # Another process may evict the entry between its download and our pin; then
            # download again. Twice in a row means the cache is far too small.
            for _ in range(3):
                try:
                    entry = download_adapter(self.storage, job_id, self.cache_dir, self.max_bytes)
                except ObjectNotFound:
                    log.info("no adapter in storage for %s", name)
                    return None
                fd = pin_entry(entry)
                if fd is None:
                    continue
                base = adapter_base_model(entry)
                if base is None or base not in served_bases:
                    os.close(fd)
                    log.warning(
                        "adapter %s was trained on %r, not on a base this server serves (%s)",
                        name, base, ", ".join(sorted(served_bases)),
                    )
                    evict_least_recently_used(self.cache_dir, self.max_bytes)
                    return None
                with self._lock:
                    self._pins[name] = fd
                self._touch(entry)
                evict_least_recently_used(self.cache_dir, self.max_bytes)
                return entry
            raise StorageError(
                f"adapter {name} was evicted from {self.cache_dir} as soon as it was "
                f"downloaded; raise {CACHE_MAX_MB_ENV}"
            )

    @staticmethod
    def _touch(entry: Path) -> Path:
        # The entry's mtime is its last use: eviction deletes the oldest first.
        os.utime(entry)
        return entry

    def close(self) -> None:
        """Release every pin (a process exiting releases them too)."""
        with self._lock:
            for fd in self._pins.values():
                os.close(fd)
            self._pins.clear()
