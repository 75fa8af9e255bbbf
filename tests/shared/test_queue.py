"""Wake-up messages on the embedded broker (kombu's SQLAlchemy transport on a SQLite file)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from shared.queue import get_celery


def _enqueue_at(data_dir: str, start_at: float, job_id: str, attempts: int) -> bool:
    os.environ["TUNERY_DATA_DIR"] = data_dir
    from shared.queue import enqueue_training

    time.sleep(max(0.0, start_at - time.time()))
    return enqueue_training(job_id, attempts=attempts)


def queued_messages() -> int:
    with get_celery().connection_for_read() as conn:
        queue = conn.SimpleQueue("train", no_ack=True)
        count = int(queue.qsize())
        queue.close()
        return count


def test_processes_enqueueing_at_once_on_a_new_broker_lose_no_message(tunery_env: Path) -> None:
    # Regression: kombu's get-or-create of the queue row is guarded only within one process,
    # so two processes declaring at once made one publish fail with a UNIQUE violation.
    context = mp.get_context("spawn")
    start_at = time.time() + 4.0
    with context.Pool(4) as pool:
        results = pool.starmap(
            _enqueue_at, [(str(tunery_env), start_at, f"job-{i}", 3) for i in range(4)]
        )
    assert results == [True] * 4
    assert queued_messages() == 4


def test_enqueue_reports_failure_instead_of_raising_when_broker_is_unreachable(
    tunery_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.queue import enqueue_training
    from shared.settings import get_settings

    monkeypatch.setenv("TUNERY_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    get_celery.cache_clear()
    started = time.monotonic()
    assert enqueue_training("job-x", attempts=2) is False
    assert time.monotonic() - started < 30
