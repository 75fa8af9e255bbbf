"""Prometheus metrics of real processes: `tunery api --workers 2`, whose every scrape sums both
processes, and a worker whose own /metrics shows the job it ran."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cli.local_stack import LocalStack, free_port, wait_until_answers
from cli.process_commands import tunery_command
from tests.conftest import ASSETS_DIR, make_payload
from tests.e2e.conftest import TERMINAL, create_key, stack_env, tiny_payload
from tests.prometheus_text import Samples, names, parse_samples, sample


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return parse_samples(response.text)


class TwoApiProcesses:
    """`tunery api --workers 2` on a fresh data dir, its temp dir under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.temp = tmp_path / "tmp"
        self.temp.mkdir()
        self.log = tmp_path / "api.log"
        # Migrated once before the two processes start, so they never race on it.
        self.env = stack_env(tmp_path / "data", [ASSETS_DIR], TUNERY_AUTO_MIGRATE="false",
                             TMPDIR=str(self.temp))
        subprocess.run(tunery_command("db", "upgrade"), env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                tunery_command("api", "--workers", "2", "--port", str(port), "--quiet"),
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture
def two_api_processes(tmp_path: Path) -> Iterator[TwoApiProcesses]:
    api = TwoApiProcesses(tmp_path)
    try:
        wait_until_answers(f"{api.base_url}/healthz", api.process,
                           name="tunery api --workers 2", timeout_s=90)
        yield api
    finally:
        api.stop()
        print(api.log.read_text(errors="replace")[-4000:])


def healthz_count(samples: Samples) -> float:
    return sample(samples, "tunery_http_requests_total", method="GET", route="/healthz",
                  status="200") or 0.0


def scrape_count(samples: Samples) -> float:
    return sample(samples, "tunery_http_requests_total", method="GET", route="/metrics",
                  status="200") or 0.0


def test_every_scrape_of_two_api_processes_counts_the_requests_both_served(
    two_api_processes: TwoApiProcesses,
) -> None:
    base_url = two_api_processes.base_url
    (metric_files,) = two_api_processes.temp.glob("tunery-api-metrics-*")
    key = create_key(two_api_processes.env)
    submitted = httpx.post(f"{base_url}/v1/finetune/llm", json=make_payload(), timeout=30,
                           headers={"Authorization": f"Bearer {key}"})
    assert submitted.status_code == 201, submitted.text
    # Without a token: this machine may scrape.
    before = scrape(f"{base_url}/metrics")

    requests_made = 200

    def one_request(_: int) -> int:
        # A connection each: the kernel hands each to whichever process accepts first.
        return httpx.get(f"{base_url}/healthz", timeout=10).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(one_request, range(requests_made))) == {200}
    scrapes = [scrape(f"{base_url}/metrics") for _ in range(6)]

    # Both processes served some of them: each wrote counters to its own file.
    writers = {path.stem.rsplit("_", 1)[1] for path in metric_files.glob("counter_*.db")}
    assert len(writers) == 2, sorted(p.name for p in metric_files.iterdir())
    for done, samples in enumerate(scrapes, start=1):
        assert healthz_count(samples) == healthz_count(before) + requests_made
        # Each scrape is counted once, whichever process answered it.
        assert scrape_count(samples) == scrape_count(before) + done
        # Read once per scrape from the database, never once per process.
        assert sample(samples, "tunery_jobs", state="QUEUED") == 1
        assert sample(samples, "tunery_queue_depth", device_class="train") == 1
        assert sample(samples, "tunery_broker_waiting_messages", device_class="train") == 1
        assert sample(samples, "tunery_database_up") == 1

    # Stopped, the API leaves no metric files behind for a later start to sum in.
    two_api_processes.stop()
    assert list(two_api_processes.temp.glob("tunery-api-metrics-*")) == []


def test_a_worker_shows_its_job_its_phases_tokens_per_second_and_lease_renewals(
    tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack],
) -> None:
    import torch

    port = free_port()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    env = stack_env(tmp_path / "data", [ASSETS_DIR, tiny_model_dir],
                    TUNERY_WORKER_METRICS_PORT=str(port), TUNERY_HEARTBEAT_SECONDS="0.2",
                    TUNERY_RATE_LIMIT_PER_MINUTE="0")
    stack = start_stack(env)
    assert stack.worker is not None
    wait_until_answers(metrics_url, stack.worker, name="the worker's metrics", timeout_s=120)
    idle = scrape(metrics_url)
    assert sample(idle, "tunery_worker_jobs_started_total") == 0
    key = create_key(env)
    with httpx.Client(base_url=stack.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        submitted = client.post("/v1/finetune/llm",
                                json=tiny_payload(tiny_model_dir, num_train_epochs=1))
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]
        # tokens/s is the running job's: read while it trains, 0 again once it is done.
        busiest, status, deadline = 0.0, "QUEUED", time.monotonic() + 300
        while status not in TERMINAL and time.monotonic() < deadline:
            for _ in range(10):
                busiest = max(busiest, sample(scrape(metrics_url),
                                              "tunery_worker_tokens_per_second") or 0.0)
                time.sleep(0.02)
            status = client.get(f"/v1/finetune/llm/{job_id}").json()["status"]
        job = client.get(f"/v1/finetune/llm/{job_id}").json()
    assert job["status"] == "COMPLETED", job
    done = scrape(metrics_url)

    assert busiest > 0
    assert sample(done, "tunery_worker_tokens_per_second") == 0
    assert sample(done, "tunery_worker_jobs_started_total") == 1
    assert sample(done, "tunery_worker_jobs_finished_total", outcome="completed") == 1
    assert sample(done, "tunery_worker_jobs_finished_total", outcome="failed") == 0
    assert sample(done, "tunery_worker_job_duration_seconds_count", outcome="completed") == 1
    for phase in ("loading_data", "loading_model", "training", "uploading"):
        assert sample(done, "tunery_worker_phase_duration_seconds_count", phase=phase) == 1
        assert (sample(done, "tunery_worker_phase_duration_seconds_sum", phase=phase) or 0) > 0
    assert sample(done, "tunery_worker_training_steps_total") == job["result"]["steps"] > 0
    assert (sample(done, "tunery_worker_lease_renewals_total", result="renewed") or 0) > 0
    assert sample(done, "tunery_worker_lease_renewals_total", result="refused") == 0
    assert sample(done, "tunery_worker_leases_lost_total") == 0
    gpu = {"tunery_worker_gpu_memory_allocated_bytes", "tunery_worker_gpu_memory_reserved_bytes"}
    assert (gpu <= names(done)) == torch.cuda.is_available()
