"""The worker's own metrics in this process: an attempt's phases, outcome and duration, the GPU
memory collector, and the /metrics server a worker starts."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from cli.local_stack import free_port
from shared.models import JobStatus
from shared.settings import Settings
from tests.fake_clock import FakeClock
from tests.prometheus_text import names, parse_samples, sample
from worker.metrics import TOKENS_PER_SECOND, AttemptMetrics, GpuMemoryCollector
from worker.metrics_server import serve_worker_metrics


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_attempt_times_each_phase_and_its_whole_run_under_its_outcome() -> None:
    phases = ("loading_data", "loading_model", "training", "uploading")
    before = {p: counted("tunery_worker_phase_duration_seconds_sum", phase=p) for p in phases}
    started = counted("tunery_worker_jobs_started_total")
    completed = counted("tunery_worker_jobs_finished_total", outcome="completed")
    timed = counted("tunery_worker_job_duration_seconds_sum", outcome="completed")
    clock = FakeClock()

    attempt = AttemptMetrics(clock=clock)
    TOKENS_PER_SECOND.set(1234.0)
    for phase, seconds in zip(phases, (3.0, 5.0, 60.0, 2.0), strict=True):
        attempt.enter_phase(phase)
        clock.now += seconds
    attempt.ended_as(JobStatus.COMPLETED)
    attempt.end()
    attempt.end()  # once only

    spent = {p: counted("tunery_worker_phase_duration_seconds_sum", phase=p) - before[p]
             for p in phases}
    assert spent == {"loading_data": 3.0, "loading_model": 5.0, "training": 60.0,
                     "uploading": 2.0}
    assert counted("tunery_worker_jobs_started_total") == started + 1
    assert counted("tunery_worker_jobs_finished_total", outcome="completed") == completed + 1
    assert counted("tunery_worker_job_duration_seconds_sum", outcome="completed") == timed + 70
    assert counted("tunery_worker_tokens_per_second") == 0  # no job trains any more


@pytest.mark.parametrize(("status", "outcome"), [
    (None, "lost"), (JobStatus.FAILED, "failed"), (JobStatus.CANCELLED, "cancelled"),
    (JobStatus.QUEUED, "handed_back"), (JobStatus.PAUSED, "paused"),
])
def test_an_attempt_ends_under_the_status_it_recorded_or_as_lost(
    status: JobStatus | None, outcome: str
) -> None:
    before = counted("tunery_worker_jobs_finished_total", outcome=outcome)
    attempt = AttemptMetrics(clock=FakeClock())
    if status is not None:
        attempt.ended_as(status)
    attempt.end()
    assert counted("tunery_worker_jobs_finished_total", outcome=outcome) == before + 1


def test_gpu_memory_is_read_at_scrape_time_where_cuda_is_and_absent_elsewhere() -> None:
    import torch

    registry = CollectorRegistry()
    registry.register(GpuMemoryCollector())
    if not torch.cuda.is_available():
        assert generate_latest(registry) == b""
        return
    held = torch.empty(64 * 1024**2, dtype=torch.uint8, device="cuda:0")
    samples = parse_samples(generate_latest(registry).decode())
    allocated = sample(samples, "tunery_worker_gpu_memory_allocated_bytes", device="0")
    reserved = sample(samples, "tunery_worker_gpu_memory_reserved_bytes", device="0")
    assert allocated is not None and reserved is not None
    assert reserved >= allocated >= held.numel()
    del held


def test_a_worker_serves_its_metrics_on_the_configured_port() -> None:
    port = free_port()
    settings = Settings(worker_metrics_port=port, worker_metrics_host="127.0.0.1")
    assert serve_worker_metrics(settings)
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    served = names(parse_samples(response.text))
    assert {"tunery_worker_jobs_started_total", "tunery_worker_jobs_finished_total",
            "tunery_worker_tokens_per_second", "tunery_worker_leases_lost_total"} <= served


def test_no_port_serves_nothing_and_a_taken_port_is_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert not serve_worker_metrics(Settings())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="tunery.worker"):
            assert not serve_worker_metrics(Settings(worker_metrics_port=port))
    assert f"127.0.0.1:{port}" in caplog.text and "TUNERY_WORKER_METRICS_PORT" in caplog.text
