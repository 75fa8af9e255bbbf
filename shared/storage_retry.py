"""How a worker rides out an unavailable object store: the one retry policy of storage calls.

Each storage call fails fast (`S3Storage`'s connect and read timeouts, two tries at most);
above that, `call_with_retries` tries again with growing waits until one deadline
(`storage.retry_deadline_s`) has passed since the first failure, saying so in the job's log
once per retry. Past the deadline it raises `StorageUnreachable`, which the worker answers by
handing the job back to the queue with its last checkpoint. Only `StorageUnreachable` is
retried: a missing bucket or a refused key stays wrong however long one waits.

The API does not use this: a route answers 503 at the first failure rather than hold a
client for minutes.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from shared.storage import Storage, StorageUnreachable, StoredObject, storage_from_settings

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["RetryPolicy", "RetryingStorage", "call_with_retries", "retrying_storage"]

T = TypeVar("T")
LogFn = Callable[[str], None]


def _no_log(line: str) -> None:
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Waits of 1, 2, 4, ... seconds, at most `max_wait_s`, until `deadline_s` has passed.

    `clock` and `sleep` are injectable so the schedule can be tested without waiting."""

    deadline_s: float
    first_wait_s: float = 1.0
    max_wait_s: float = 30.0
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def waits(self) -> Iterator[float]:
        wait = self.first_wait_s
        while True:
            yield wait
            wait = min(wait * 2, self.max_wait_s)


def call_with_retries(
    call: Callable[[], T], policy: RetryPolicy, *, log: LogFn = _no_log
) -> T:
    """`call()`, retried after `StorageUnreachable` until `policy.deadline_s` has passed since
    the first failure; then the last `StorageUnreachable` is raised, saying for how long."""
    started: float | None = None
    for retry, wait in enumerate(policy.waits(), start=1):
        try:
            return call()
        except StorageUnreachable as exc:
            now = policy.clock()
            started = now if started is None else started
            left = policy.deadline_s - (now - started)
            if left <= 0:
                raise StorageUnreachable(
                    f"storage unavailable for {now - started:.0f} s, past the retry deadline "
                    f"of {policy.deadline_s:.0f} s (TUNERY_STORAGE_RETRY_DEADLINE_S): {exc}"
                ) from exc
            wait = min(wait, left)
            log(f"storage unavailable, retry {retry} in {wait:.0f} s: {exc}")
            policy.sleep(wait)
    raise AssertionError("unreachable: waits() never ends")


class RetryingStorage(Storage):
    """`storage` with every call retried under `policy` (`call_with_retries`), retries told to
    `log`. A stream (`iter_bytes`) is retried until it opens, not once it has started."""

    def __init__(self, storage: Storage, policy: RetryPolicy, log: LogFn = _no_log) -> None:
        self.storage = storage
        self.policy = policy
        self.log = log

    def __repr__(self) -> str:
        return repr(self.storage)

    def _retry(self, call: Callable[[], T]) -> T:
        return call_with_retries(call, self.policy, log=self.log)

    def put_file(self, key: str, path: Path) -> None:
        self._retry(lambda: self.storage.put_file(key, path))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._retry(lambda: self.storage.put_bytes(key, data))

    def download_file(self, key: str, dest: Path) -> None:
        self._retry(lambda: self.storage.download_file(key, dest))

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self._retry(lambda: self.storage.iter_bytes(key, chunk_size))

    def list(self, prefix: str) -> builtins.list[StoredObject]:
        return self._retry(lambda: self.storage.list(prefix))

    def size(self, key: str) -> int:
        return self._retry(lambda: self.storage.size(key))

    def exists(self, key: str) -> bool:
        return self._retry(lambda: self.storage.exists(key))

    def delete(self, key: str) -> None:
        self._retry(lambda: self.storage.delete(key))

    def delete_prefix(self, prefix: str) -> None:
        self._retry(lambda: self.storage.delete_prefix(prefix))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self._retry(lambda: self.storage.presigned_url(key, expires_s))

    def presigned_upload_url(self, key: str, expires_s: int) -> str | None:
        return self._retry(lambda: self.storage.presigned_upload_url(key, expires_s))

    def check(self) -> None:
        self.storage.check()  # a probe answers now, retrying would defeat it


def retrying_storage(settings: Settings, log: LogFn = _no_log) -> RetryingStorage:
    """The store of `settings`, every call retried up to `storage.retry_deadline_s`; what a
    worker reads and writes through."""
    policy = RetryPolicy(settings.storage.retry_deadline_s)
    return RetryingStorage(storage_from_settings(settings), policy, log)
