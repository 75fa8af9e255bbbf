"""Where a job runs and where its hub downloads go.

Loaders read relative names from the current directory: `datasets.load_dataset` and
`from_pretrained` try a local directory named like the id first, and a packaged builder reads
data files under it. A job therefore runs in an empty directory of its own, never in the
checkout or the data dir.

Hub downloads made with a tenant's token may be private: they go to a cache only that
tenant's jobs use. Public downloads (no token) share the default Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@contextmanager
def job_working_directory(path: Path) -> Iterator[Path]:
    """Run the block with `path` (created empty, 0700) as the current directory; the
    previous one is restored after. The process has one current directory: a worker runs one
    job at a time (Celery solo pool)."""
    path.mkdir(mode=0o700)
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


def tenant_hub_cache(local_dir: Path, tenant_id: str | None, token: str | None) -> Path | None:
    """The hub cache of a job: None (the shared cache) without a token; with one, the
    tenant's own `<local_dir>/hf-cache/tenants/<tenant>` (0700, under
    `Settings.local_files_dir()`), created if needed. A job
    without a known tenant gets a cache of its token's digest instead."""
    if not token:
        return None
    owner = tenant_id if tenant_id and _PLAIN_ID.fullmatch(tenant_id) else (
        "token-" + hashlib.sha256(token.encode()).hexdigest()[:32]
    )
    tenants = _tenant_caches(local_dir)
    tenants.mkdir(mode=0o700, parents=True, exist_ok=True)
    cache = tenants / owner
    cache.mkdir(mode=0o700, exist_ok=True)
    return cache


def _tenant_caches(local_dir: Path) -> Path:
    return local_dir / "hf-cache" / "tenants"


def existing_tenant_hub_cache(local_dir: Path, tenant_id: str) -> Path | None:
    """The tenant's own hub cache if one of its jobs made it (it trained with a token), else
    None. An export reads a private base from there after the job's token was dropped."""
    if not _PLAIN_ID.fullmatch(tenant_id):
        return None
    cache = _tenant_caches(local_dir) / tenant_id
    return cache if cache.is_dir() else None
