"""Webhooks from real processes: the worker's senders deliver a real job's events to a real
receiver on 127.0.0.1, and a worker killed (SIGKILL) in the middle of a delivery leaves it to
the next worker, which sends it again with the same webhook-id."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR, make_payload
from tests.e2e.conftest import create_key, stack_env, tiny_payload, wait_for_terminal
from tests.webhook_receiver import receiver, signed_by, verify_with_openai

LOOPBACK = {
    "TUNERY_ALLOW_HTTP_URLS": "true",
    "TUNERY_ALLOWED_PRIVATE_URL_HOSTS": '["127.0.0.1"]',
    "TUNERY_WEBHOOK_POLL_INTERVAL_S": "0.2",
    "TUNERY_RATE_LIMIT_PER_MINUTE": "0",
}


def api(stack: LocalStack, env: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, timeout=30,
                        headers={"Authorization": f"Bearer {create_key(env)}"})


def endpoint(client: httpx.Client, url: str, **fields: Any) -> dict[str, Any]:
    created = client.post("/v1/webhook_endpoints", json={"url": url, **fields})
    assert created.status_code == 200, created.text
    return dict(created.json())


def test_a_jobs_events_reach_the_receiver_signed_from_queued_to_succeeded(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack],
) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir], **LOOPBACK,
                    TUNERY_CHECKPOINT_EVERY_STEPS="10")
    stack = start_stack(env)
    with receiver() as hooks, api(stack, env) as client:
        secret = endpoint(client, hooks.url)["signing_secret"]
        submitted = client.post("/v1/finetune/llm", json=tiny_payload(tiny_model_dir))
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]
        assert wait_for_terminal(client, job_id)["status"] == "COMPLETED"

        def types() -> list[str]:
            return [json.loads(r.body)["type"] for r in hooks.received]

        def arrived(count: int) -> None:
            hooks.wait_for(count, timeout_s=60)

        while "fine_tuning.job.succeeded" not in types():
            arrived(len(hooks.received) + 1)
    seen = types()
    for expected in ("tunery.job.queued", "tunery.job.started", "tunery.job.checkpoint_saved",
                     "fine_tuning.job.succeeded"):
        assert expected in seen, seen
    assert seen.index("tunery.job.started") < seen.index("tunery.job.checkpoint_saved")
    assert all(signed_by(r, secret) for r in hooks.received)
    succeeded = next(r for r in hooks.received if b"fine_tuning.job.succeeded" in r.body)
    event = verify_with_openai(succeeded, secret)
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == f"ftjob-{job_id}"
    checkpoint = next(json.loads(r.body) for r in hooks.received
                      if b"checkpoint_saved" in r.body)
    assert checkpoint["data"]["job_id"] == job_id and checkpoint["data"]["step"] % 10 == 0


def test_a_worker_killed_mid_delivery_leaves_it_to_the_next_one_with_the_same_id(
    tmp_path: Path, start_stack: Callable[..., LocalStack],
) -> None:
    env = stack_env(tmp_path / "data", [ASSETS_DIR], **LOOPBACK,
                    TUNERY_WEBHOOK_TIMEOUT_S="8")
    stack = start_stack(env)
    with receiver(hold_first=True) as hooks, api(stack, env) as client:
        created = endpoint(client, hooks.url, event_types=["tunery.job.queued"])
        job_id = client.post("/v1/finetune/llm", json=make_payload()).json()["job_id"]
        client.post(f"/v1/finetune/llm/{job_id}/cancel")
        held = hooks.wait_for(1, timeout_s=120)[0]  # the worker's sender is waiting on it
        assert stack.worker is not None
        os.killpg(stack.worker.pid, signal.SIGKILL)
        stack.worker.wait(timeout=30)
        stack.start_worker()
        again = hooks.wait_for(2, timeout_s=120)[1]
        attempts = client.get(f"/v1/webhook_endpoints/{created['id']}/attempts").json()["data"]
    assert again.webhook_id == held.webhook_id
    assert again.body == held.body
    assert signed_by(again, created["signing_secret"])
    lost, delivered = reversed(attempts)
    assert (lost["attempt"], lost["status_code"]) == (1, None)
    assert "sender stopped" in lost["error"]
    assert (delivered["attempt"], delivered["status_code"]) == (2, 200)
    assert delivered["delivery_status"] == "delivered"
    assert {lost["webhook_id"], delivered["webhook_id"]} == {held.webhook_id}
