"""A starting worker re-queues the jobs of this host's worker processes that are gone, on the
embedded stack (SQLite, the kombu SQLite broker) with real processes standing for the workers
whose leases it finds; leases of live workers and of other hosts stay."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import jobs
from shared.db import session_scope
from shared.models import Job, JobStatus
from shared.queue import count_waiting_messages
from tests.shared.test_maintenance import embedded, submit
from worker.gone_workers import release_gone_workers

MARKER = "worker.tasks"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def start(processes: list[subprocess.Popen[bytes]], *argv: str) -> int:
    process = subprocess.Popen(list(argv))
    processes.append(process)
    return process.pid


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid names no process now
    return process.pid


def lease(job_id: str, owner: str) -> None:
    with session_scope() as session:
        # A lease that runs for minutes still: only the process's death may end it early.
        assert jobs.claim_job(session, job_id, owner, 600) is not None


def statuses(*job_ids: str) -> list[str]:
    with session_scope() as session:
        return [session.get_one(Job, job_id).status for job_id in job_ids]


def test_jobs_of_gone_workers_on_this_host_are_requeued_and_woken_the_others_stay(
    tunery_env: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    embedded(tunery_env)
    gone, reused, restarted, live, elsewhere = submit(5)
    gone_pid = dead_pid()
    # A live worker's command line holds the Celery app's module, as `celery -A worker.tasks`.
    live_pid = start(processes, sys.executable, "-c", "import time; time.sleep(60)", MARKER)
    # The pid of a gone worker, taken by another program since.
    reused_pid = start(processes, "sleep", "60")
    lease(gone, jobs.worker_identity(gone_pid))
    lease(reused, jobs.worker_identity(reused_pid))
    lease(restarted, jobs.worker_identity(os.getpid()))  # this container's previous life
    lease(live, jobs.worker_identity(live_pid))
    lease(elsewhere, f"another-host:{gone_pid}")  # the pid says nothing about another host

    moved = release_gone_workers(os.getpid(), MARKER)

    assert sorted(moved) == sorted([(gone, JobStatus.QUEUED), (reused, JobStatus.QUEUED),
                                    (restarted, JobStatus.QUEUED)])
    assert statuses(gone, reused, restarted, live, elsewhere) == [
        "QUEUED", "QUEUED", "QUEUED", "RUNNING", "RUNNING"]
    assert count_waiting_messages("train") == 3  # one wake-up per re-queued job
    with session_scope() as session:
        job = session.get_one(Job, gone)
        assert (job.attempt, job.lease_owner) == (1, None)
        # The lost attempt counts, as for an expired lease: the next claim is attempt 2.
        again = jobs.claim_job(session, gone, "new-worker", 60)
    assert again is not None and again.attempt == 2
    assert release_gone_workers(os.getpid(), MARKER) == []


def test_a_lease_of_this_host_whose_pid_is_alive_as_a_worker_is_left_to_its_worker(
    tunery_env: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    embedded(tunery_env)
    (job_id,) = submit(1)
    live_pid = start(processes, sys.executable, "-c", "import time; time.sleep(60)", MARKER)
    lease(job_id, jobs.worker_identity(live_pid))

    assert release_gone_workers(os.getpid(), MARKER) == []
    assert statuses(job_id) == ["RUNNING"]
    assert count_waiting_messages("train") == 0
