"""A starting worker re-queues the jobs of this host's worker processes that are gone.

A worker killed without a supervisor that sees it exit (`tunery up` does; Docker's restart
policy, systemd and Kubernetes do not tell Tunery) leaves its job RUNNING until the lease
expires. Its replacement usually starts on the same host, so it looks at the leases written
there (`shared.jobs.worker_identity`: hostname and pid) and moves on at once the jobs whose
process is gone, as `tunery up` does (`shared.maintenance.release_dead_worker`).

Why the hostname makes this safe: a pid means something only inside its pid namespace. In
Docker or Kubernetes every worker may be pid 1 (or 7) in a container of its own, but each
container has a hostname of its own too (the container id, the pod name), so a lease of
another container's worker never matches this host's prefix. A container restarted in place
keeps its hostname and often its pid: a lease under this very process's identity was then
written by its previous life, since this process has not claimed anything yet. Where
containers share a hostname without sharing pids (host networking), the check would be wrong:
`TUNERY_RELEASE_DEAD_LOCAL_WORKERS=false` turns it off, and the lease decides alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shared import jobs
from shared.db import session_scope
from shared.maintenance import release_dead_worker
from shared.models import JobStatus

log = logging.getLogger(__name__)


def release_gone_workers(own_pid: int, worker_marker: str) -> list[tuple[str, JobStatus]]:
    """Move on the RUNNING jobs leased by worker processes of this host that are gone, and
    send their wake-ups. Call it before this process claims anything. `worker_marker` is what
    every worker's command line holds (the Celery app's module): a live pid whose command
    line lacks it was reused by another program. Returns (job id, new status)."""
    with session_scope() as session:
        pids = jobs.leasing_pids_on_this_host(session)
    moved: list[tuple[str, JobStatus]] = []
    for pid in pids:
        death = _death(pid, own_pid, worker_marker)
        if death is not None:
            moved.extend(release_dead_worker(pid, death))
    for job_id, status in moved:
        log.warning("job %s: its worker on this host is gone; %s", job_id, status.value)
    return moved


def _death(pid: int, own_pid: int, worker_marker: str) -> str | None:
    """How the worker `pid` of this host went, or None while it may still be a worker."""
    if pid == own_pid:
        return f"worker pid {pid} on this host is gone (restarted: this worker has its pid now)"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"worker pid {pid} on this host is gone"
    except PermissionError:
        pass  # alive, another user's: its command line below says what it is
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self/cmdline").exists():
            return f"worker pid {pid} on this host is gone"  # it exited meanwhile
        return None  # no /proc (macOS): a live pid may be a worker; its lease decides
    except OSError:
        return None
    if worker_marker.encode() not in command:
        return f"worker pid {pid} on this host is gone (the pid is another program's now)"
    return None
