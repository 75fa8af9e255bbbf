"""Metrics of several API processes, summed: prometheus_client's multiprocess mode.

`tunery api --workers N` starts N processes behind one port, and a scrape reaches any one of
them. Each process writes its counters to memory-mapped files in PROMETHEUS_MULTIPROC_DIR, and
the process that answers a scrape sums every process's files. prometheus_client reads the
variable once, when it is imported: it must be set before the processes start, which is why
the parent sets it up (`api.serve`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """Where this process's metric files are, when it is one of several; else None."""
    return os.environ.get(MULTIPROC_DIR_VARIABLE) or None


@contextmanager
def metric_files_for(processes: int) -> Iterator[str | None]:
    """For more than one process, a new, empty directory for their metric files, named in
    the environment they inherit and removed once they have stopped: files from an earlier
    start, whose counters would be summed in, are never read. For one process, none: its
    metrics live in its memory, and a variable inherited from the environment is dropped."""
    if processes <= 1:
        os.environ.pop(MULTIPROC_DIR_VARIABLE, None)
        yield None
        return
    # The system temp dir rather than the data dir: memory-mapped files must not sit on a
    # network filesystem, and they outlive nothing.
    path = tempfile.mkdtemp(prefix="tunery-api-metrics-")
    os.environ[MULTIPROC_DIR_VARIABLE] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_DIR_VARIABLE, None)
        shutil.rmtree(path, ignore_errors=True)


def forget_this_process() -> None:
    """A stopping process takes its share of the live gauges (requests in flight) with it;
    its counters stay in the sums."""
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), path)
