"""Device classes with real workers: two worker processes on PostgreSQL and Redis, one serving
the class `small` (1 device), one the class `pair` (2 devices). A job asking for 2 devices
and one asking for 1 are each claimed by the worker of their class, whichever is free first
and whichever job is older.

Not a fault scenario: it runs on the chaos stack because that is where real workers, a
private Redis and PostgreSQL come together. A job on 2 devices trains single-process on
today's worker, which is all this test needs: it asserts who claims, not how it trains.
"""

from __future__ import annotations

import json
import socket

from tests.chaos.stack import ChaosStack, chaos_payload

CLASSES = [{"name": "small", "devices": 1}, {"name": "pair", "devices": 2}]


def test_each_job_is_claimed_by_the_worker_of_its_device_class(chaos_stack: ChaosStack) -> None:
    stack = chaos_stack
    # The API and every worker read the same classes.
    stack.env["TUNERY_DEVICE_CLASSES"] = json.dumps(CLASSES)
    stack.start_api()
    workers = {
        "small": stack.start_worker(wait=False, TUNERY_WORKER_DEVICE_CLASS="small"),
        "pair": stack.start_worker(wait=False, TUNERY_WORKER_DEVICE_CLASS="pair",
                                   TUNERY_WORKER_DEVICES="2"),
    }
    for worker in workers.values():
        worker.wait_ready()

    # The 2-device job first: the idle small worker must leave the older job alone.
    job_ids = {}
    with stack.client() as client:
        for device_class, devices in (("pair", 2), ("small", 1)):
            payload = chaos_payload(stack.model_dir, epochs=1)
            payload["training_config"]["devices"] = devices
            response = client.post("/v1/finetune/llm", json=payload)
            assert response.status_code == 201, response.text
            job_ids[device_class] = response.json()["job_id"]
            assert client.get(f"/v1/finetune/llm/{job_ids[device_class]}").json()[
                "device_class"] == device_class

    host = socket.gethostname()
    for device_class, job_id in job_ids.items():
        owner = f"{host}:{workers[device_class].pid}"
        trace = stack.wait_for(
            job_id, f"attempt 1 started on the {device_class} worker",
            lambda t: any(log.line.startswith("attempt 1 started on ") for log in t.logs),
            timeout_s=120)
        assert [log.line for log in trace.logs if log.line.startswith("attempt ")][0] == \
            f"attempt 1 started on {owner}", stack.describe(job_id)
        assert [e.reason for e in trace.events if e.to_status == "RUNNING"] == [
            f"claimed by {owner}"]
        assert trace.row["device_class"] == device_class
