"""Pause and resume with real training on the tiny model.

A pause ends training at the next step boundary, after that step's planned evaluation, with a
checkpoint of the step reached (also where no checkpoint is saved along the way); a pause as
training ends anyway lets the job finish. The resumed run trains every remaining step once and
ends with the uninterrupted run's steps and adapter. Through the whole attempt (database, real
heartbeat): a job paused mid-run ends PAUSED with its attempt given back and COMPLETED once
resumed; a job paused while its dataset downloads pauses before training.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from shared import jobs
from shared.db import session_scope
from shared.jobs import Claim
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobEvent, JobMetric, JobStatus
from shared.schema import FinetuneRequest
from shared.settings import Settings, get_settings
from shared.storage import LocalStorage, storage_from_settings
from shared.storage_keys import job_artifact_key
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.checkpoints import CheckpointStore, list_checkpoints
from worker.pipeline.errors import StopReason, TrainingStopped
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import TrainResult, run_job
from worker.tasks import run_claimed_job

# As in test_checkpoints: stopped and resumed runs end with bit-identical weights here; the
# tolerance only leaves room for kernels that are not bit-deterministic elsewhere.
RESUME_ATOL = 1e-6
# 10 epochs of 6 steps, an evaluation every 6; early stopping ends the run at step 48. A long
# run, so that a pause lands between evaluations and early stopping's count matters.
LONG = {"num_train_epochs": 10}
LONG_RUN_STEPS = 48
MAX_ATTEMPTS = 3


class PausesAt(RecordingReporter):
    """Asks to pause (or another stop that hands the job back) once step `at` is reported:
    training is then past that step's end, so it stops at the end of the next one."""

    def __init__(self, at: int, reason: StopReason = StopReason.PAUSED) -> None:
        super().__init__()
        self.at = at
        self.reason = reason

    def metric(self, step: int, values: dict[str, float]) -> None:
        super().metric(step, values)
        if step >= self.at:
            self.request_stop(self.reason)


@dataclass
class Run:
    result: TrainResult
    reporter: RecordingReporter


@dataclass
class Stack:
    settings: Settings
    work: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Stack:
    tmp = tmp_path_factory.mktemp("pause")
    settings = Settings(
        data_dir=tmp / "data", allowed_local_dirs=[DATASET_PATH.parent, tiny_model_dir.parent]
    )
    return Stack(settings, tmp)


@pytest.fixture(scope="module")
def uninterrupted(stack: Stack, make_request: Any) -> Run:
    reporter = RecordingReporter()
    result = run_job(make_request(training=LONG), stack.work / "uninterrupted", reporter,
                     stack.settings)
    assert result.steps == LONG_RUN_STEPS
    return Run(result, reporter)


def store(tmp_path: Path, every_steps: int) -> CheckpointStore:
    return CheckpointStore(LocalStorage(tmp_path / "storage"), "job", every_steps=every_steps,
                           keep=5)


def assert_same_adapter(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=RESUME_ATOL, rtol=0)


# The worker stopping (SIGTERM) hands the job back like a pause: the next attempt resumes
# from the step it stopped at.
@pytest.mark.parametrize("reason", [StopReason.PAUSED, StopReason.WORKER_STOPPING])
@pytest.mark.parametrize(("every_steps", "saved"), [(2, [2, 4, 5]), (0, [5])])
def test_a_pause_ends_training_at_the_next_step_and_keeps_its_checkpoint(
    settings: Settings, tmp_path: Path, make_request: Any, every_steps: int, saved: list[int],
    reason: StopReason,
) -> None:
    checkpoints = store(tmp_path, every_steps)

    with pytest.raises(TrainingStopped) as stopped:
        run_job(make_request(), tmp_path / "work", PausesAt(4, reason), settings, checkpoints)

    assert (stopped.value.reason, stopped.value.step) == (reason, 5)
    # Periodic checkpoints off (0) or not due: the pause saves the step it reached all the same.
    assert [c.step for c in list_checkpoints(checkpoints.storage, "job")] == saved


def test_a_pause_as_training_ends_lets_the_run_finish(
    settings: Settings, tmp_path: Path, make_request: Any
) -> None:
    reporter = PausesAt(5)  # seen at the end of step 6, the last

    result = run_job(make_request(), tmp_path / "work", reporter, settings, store(tmp_path, 2))

    assert result.steps == 6
    assert reporter.steps("loss") == [1, 2, 3, 4, 5, 6]


# Paused at 21: between two evaluations (18 and 24); at 24: on one, which runs first.
@pytest.mark.parametrize("asked_at", [20, 23])
def test_a_paused_run_resumes_to_the_uninterrupted_runs_steps_and_adapter(
    settings: Settings, tmp_path: Path, make_request: Any, uninterrupted: Run, asked_at: int
) -> None:
    checkpoints = store(tmp_path, 0)
    paused_at = asked_at + 1
    first = PausesAt(asked_at)
    with pytest.raises(TrainingStopped) as stopped:
        run_job(make_request(training=LONG), tmp_path / "a", first, settings, checkpoints)
    assert stopped.value.step == paused_at
    assert [c.step for c in list_checkpoints(checkpoints.storage, "job")] == [paused_at]

    second = RecordingReporter()
    checkpoints = replace(checkpoints, attempt=2)  # the attempt that resumes
    result = run_job(make_request(training=LONG), tmp_path / "b", second, settings, checkpoints)

    reference = uninterrupted.reporter
    assert f"resumed from step {paused_at} (attempt 2)" in second.lines
    # Every step once: the paused run's, then the rest; early stopping ends both at step 48.
    assert first.steps("loss") == list(range(1, paused_at + 1))
    assert second.steps("loss") == list(range(paused_at + 1, LONG_RUN_STEPS + 1))
    assert result.steps == uninterrupted.result.steps == LONG_RUN_STEPS
    assert second.values("loss") == pytest.approx(reference.values("loss")[paused_at:],
                                                  abs=1e-6)
    # The evaluations are the uninterrupted run's: none repeated where it resumed.
    assert first.steps("eval_loss") + second.steps("eval_loss") == reference.steps("eval_loss")
    assert result.best_step == uninterrupted.result.best_step
    assert_same_adapter(load_file(result.output_dir / "adapter_model.safetensors"),
                        load_file(uninterrupted.result.output_dir / "adapter_model.safetensors"))


@pytest.fixture
def embedded(tunery_env: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The embedded stack, the worker's settings from the environment as in production."""
    monkeypatch.setenv(
        "TUNERY_ALLOWED_LOCAL_DIRS", f'["{DATASET_PATH.parent}", "{tiny_model_dir.parent}"]'
    )
    monkeypatch.setenv("TUNERY_HEARTBEAT_SECONDS", "0.2")
    monkeypatch.setenv("TUNERY_CHECKPOINT_EVERY_STEPS", "10")
    monkeypatch.setenv("TUNERY_ALLOW_HTTP_URLS", "true")
    monkeypatch.setenv("TUNERY_ALLOWED_PRIVATE_URL_HOSTS", '["127.0.0.1"]')
    get_settings.cache_clear()
    settings = get_settings()
    upgrade_database(settings.database.url)
    return settings


def submit(request: FinetuneRequest) -> tuple[str, str]:
    with session_scope() as session:
        tenant = create_api_key(session, "pauser").tenant_id
        job_id = jobs.create_job(session, tenant, request, max_attempts=MAX_ATTEMPTS,
                                 device_class="train").id
    return tenant, job_id


def claim(job_id: str) -> Claim:
    with session_scope() as session:
        claimed = jobs.claim_job(session, job_id, "w", get_settings().leases.lease_seconds)
    assert claimed is not None
    return claimed


def pause_when(tenant: str, job_id: str, ready: Callable[[], bool]) -> threading.Thread:
    """The user's pause, from another thread once `ready()`, while the worker trains."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        with session_scope() as session:
            jobs.request_pause(session, tenant, job_id)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def loss_steps(job_id: str, attempt: int) -> list[int]:
    with session_scope() as session:
        return [m.step for m in session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.attempt == attempt)
            .order_by(JobMetric.id)) if "loss" in m.values]


def log_lines(job_id: str) -> list[str]:
    with session_scope() as session:
        return [row.line for row in jobs.tail_logs(session, job_id, 10_000)]


def resume(tenant: str, job_id: str) -> None:
    with session_scope() as session:
        assert jobs.resume_job(session, tenant, job_id).status == JobStatus.QUEUED.value


def test_a_job_paused_mid_run_resumes_to_completion_as_if_never_paused(
    embedded: Settings, make_request: Any, uninterrupted: Run
) -> None:
    request = make_request(training=LONG)
    tenant, job_id = submit(request)
    # Asked once a few steps are done: the heartbeat sees it within 0.2 s, a dozen steps
    # before the run would end.
    watcher = pause_when(tenant, job_id, lambda: len(loss_steps(job_id, 1)) >= 8)

    handed_back = run_claimed_job(claim(job_id), request)
    watcher.join()

    assert not handed_back  # PAUSED, not QUEUED: no wake-up goes back to the broker
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.PAUSED.value, job.error
        assert not job.pause_requested and job.lease_owner is None
        # The attempt is given back: a pause is none of the job's failures.
        assert (job.attempt, job.max_attempts) == (1, MAX_ATTEMPTS + 1)
        last = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                               .order_by(JobEvent.id.desc())).first()
        assert last is not None and (last.from_status, last.reason) == ("RUNNING",
                                                                       "paused by the user")
    first = loss_steps(job_id, 1)
    paused_at = first[-1]
    assert first == list(range(1, paused_at + 1)) and paused_at < LONG_RUN_STEPS
    storage = storage_from_settings(embedded)
    assert list_checkpoints(storage, job_id)[-1].step == paused_at
    assert f"paused at step {paused_at}; a resume continues from the last checkpoint" in \
        log_lines(job_id)

    resume(tenant, job_id)
    second = claim(job_id)
    assert second.attempt == 2
    run_claimed_job(second, request)

    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.COMPLETED.value, job.error
        assert job.result is not None and job.result["steps"] == LONG_RUN_STEPS
    assert f"resumed from step {paused_at} (attempt 2)" in log_lines(job_id)
    # Not one step trained twice, none left out.
    assert loss_steps(job_id, 2) == list(range(paused_at + 1, LONG_RUN_STEPS + 1))
    adapter = job_artifact_key(job_id, "adapter_model.safetensors")
    storage.download_file(adapter, embedded.data_dir / "adapter.safetensors")
    assert_same_adapter(load_file(embedded.data_dir / "adapter.safetensors"),
                        load_file(uninterrupted.result.output_dir / "adapter_model.safetensors"))


class StallsFirstDownload:
    """An HTTP server on 127.0.0.1 serving the tiny dataset: the first GET sends its headers
    and then nothing until the client hangs up (a download that hangs), later GETs the file."""

    def __init__(self, body: bytes) -> None:
        self.started = threading.Event()
        self.released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "application/jsonl")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not outer.started.is_set():
                    outer.started.set()
                    outer.released.wait(120)
                    return
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/rows.jsonl"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling_server() -> Iterator[StallsFirstDownload]:
    server = StallsFirstDownload(DATASET_PATH.read_bytes())
    yield server
    server.close()


def test_a_job_paused_while_its_dataset_downloads_pauses_before_training_and_resumes(
    embedded: Settings, make_request: Any, stalling_server: StallsFirstDownload
) -> None:
    request = make_request(data_path=stalling_server.url)
    tenant, job_id = submit(request)
    watcher = pause_when(tenant, job_id, stalling_server.started.is_set)

    started = time.monotonic()
    handed_back = run_claimed_job(claim(job_id), request)
    watcher.join()

    assert not handed_back and time.monotonic() - started < 30
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.PAUSED.value, job.error
    lines = log_lines(job_id)
    assert "paused before training; a resume continues from the last checkpoint" in lines
    assert "phase: training" not in lines and loss_steps(job_id, 1) == []

    resume(tenant, job_id)
    run_claimed_job(claim(job_id), request)

    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.COMPLETED.value, job.error
    assert loss_steps(job_id, 2) == [1, 2, 3, 4, 5, 6]
