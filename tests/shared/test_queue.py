"""Wake-up messages on the embedded broker (kombu's SQLAlchemy transport on a SQLite file) and
on Redis."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import pytest

from shared.queue import get_celery


def _enqueue_at(data_dir: str, start_at: float, job_id: str, attempts: int) -> bool:
    os.environ["TUNERY_DATA_DIR"] = data_dir
    from shared.queue import enqueue_training

    time.sleep(max(0.0, start_at - time.time()))
    return enqueue_training(job_id, "train", attempts=attempts)


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
    assert enqueue_training("job-x", "train", attempts=2) is False
    assert time.monotonic() - started < 30


# Wake-ups on Redis (the full stack's broker) ----------------------------------------------

@pytest.fixture
def redis_broker(tunery_env: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    from shared.settings import get_settings

    monkeypatch.setenv("TUNERY_BROKER_URL", redis_url)
    get_settings.cache_clear()
    get_celery.cache_clear()
    return redis_url


def stored_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The messages waiting in `queue`, oldest first, as kombu's Redis transport stores them."""
    import redis

    stored = redis.Redis.from_url(redis_url).lrange(queue, 0, -1)
    return [json.loads(raw) for raw in reversed(stored)]


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with what differs between any two messages (task id, delivery tag) blanked."""
    headers = {**message["headers"], "id": "-", "root_id": "-"}
    properties = {**message["properties"], "correlation_id": "-", "delivery_tag": "-"}
    return {**message, "headers": headers, "properties": properties}


def test_a_wake_up_sent_straight_to_redis_is_the_message_send_task_sends(
    redis_broker: str,
) -> None:
    from shared.queue import TRAIN_TASK, RedisWakeUps

    app = get_celery()
    app.send_task(TRAIN_TASK, args=["job-1"])
    RedisWakeUps(app).send("job-1", "train")
    by_celery, ours = stored_messages(redis_broker, "train")
    assert without_ids(ours) == without_ids(by_celery)
    assert ours["headers"]["id"] != by_celery["headers"]["id"]
    with app.connection_for_read() as conn:
        train = conn.SimpleQueue("train", no_ack=True)
        for _ in range(2):
            message = train.get(timeout=5)
            assert message.headers["task"] == TRAIN_TASK
            assert message.decode()[:2] == [["job-1"], {}]
        train.close()


def test_a_wake_up_on_redis_is_one_lpush_on_a_client_kept_for_the_process(
    redis_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: send_task made kombu build a new redis-py client for every message.
    import redis

    from shared.queue import enqueue_training

    assert enqueue_training("job-0", "train")  # builds the process's client
    commands: list[str] = []
    clients: list[redis.Redis] = []
    execute, init = redis.Redis.execute_command, redis.Redis.__init__

    def counted_execute(self: redis.Redis, *args: Any, **options: Any) -> Any:
        commands.append(str(args[0]))
        return execute(self, *args, **options)

    def counted_init(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        clients.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "execute_command", counted_execute)
    monkeypatch.setattr(redis.Redis, "__init__", counted_init)
    assert all(enqueue_training(f"job-{i}", "train") for i in range(1, 4))
    assert commands == ["LPUSH"] * 3
    assert clients == []
    assert [m["headers"]["argsrepr"] for m in stored_messages(redis_broker, "train")] == [
        repr([f"job-{i}"]) for i in range(4)]


def test_redis_gives_back_a_dead_workers_message_within_minutes_not_after_the_time_limit(
    tunery_env: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.queue import make_celery
    from shared.settings import Settings

    monkeypatch.setenv("TUNERY_BROKER_URL", redis_url)
    settings = Settings()
    options = make_celery(settings).conf.broker_transport_options

    # Ten leases: a running job's message comes back now and then (a wake-up that claims
    # nothing), a dead worker's within five minutes instead of a day.
    assert options["visibility_timeout"] == 10 * settings.leases.lease_seconds == 300
    assert options["visibility_timeout"] < settings.leases.job_soft_time_limit_s
