"""The premise of the KEDA redis trigger, on the machine's Redis with Tunery's own Celery
wiring: a queued wake-up is an entry of the Redis list named after the queue (the class), and
a worker that received it (not yet acknowledged: Tunery acks late, when the job ends) leaves
the list empty while the job runs. Hence the ScaledObjects' second trigger, the database's
count of QUEUED and RUNNING jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from shared.queue import enqueue_training, get_celery
from shared.settings import get_settings
from tests.deploy.kubernetes_manifests import named, render


def test_a_received_wake_up_leaves_the_class_list_empty_while_its_job_runs(
        tunery_env: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_BROKER_URL", redis_url)
    get_settings.cache_clear()
    get_celery.cache_clear()
    queue = get_settings().broker.queue_name
    scaler = named(render("external"), "ScaledObject", "tunery-worker-train")
    assert scaler["spec"]["triggers"][0]["metadata"]["listName"] == queue
    client = redis.Redis.from_url(redis_url)

    assert enqueue_training("job-1", queue)
    assert client.llen(queue) == 1

    with get_celery().connection_for_read() as connection:
        received = connection.default_channel.basic_get(queue, no_ack=False)
        assert received is not None
        assert client.llen(queue) == 0
        received.ack()
    get_celery.cache_clear()
