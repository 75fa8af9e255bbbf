"""One job on two processes, for real: `torchrun` starts two ranks with the gloo backend on
this machine's CPU, and the worker side (`train_on_devices`) watches them as it would GPUs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.jobs import Claim
from shared.settings import Settings
from shared.storage import storage_from_settings
from shared.storage_keys import job_checkpoint_prefix
from worker.assets.build_dataset import DATASET_PATH
from worker.device_group import ProcessGroupFailed, train_on_devices
from worker.group_channel import ALIVE_FILE, EventWriter, mark_alive, request_stop
from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import TrainResult, run_job

pytestmark = pytest.mark.timeout(300)

# Same examples in every optimizer step: random batches (length buckets are made per batch
# size), no dropout.
SAME_STEPS = {"group_by_length": False}


@pytest.fixture
def group_settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        allowed_local_dirs=[tmp_path, tiny_model_dir.parent, DATASET_PATH.parent],
        worker_devices=2, checkpoint_every_steps=2,
    )


def on_two(make_request: Any, settings: Settings, work_dir: Path, *, job_id: str = "job-two",
           attempt: int = 1, reporter: RecordingReporter | None = None,
           **training: Any) -> tuple[TrainResult, RecordingReporter]:
    reporter = reporter or RecordingReporter()
    request = make_request(training={"devices": 2, **SAME_STEPS, **training})
    result = train_on_devices(request, work_dir, reporter, settings,
                              claim=Claim(job_id, attempt, "worker-test"), memory_rung=0,
                              hub_cache_dir=None)
    return result, reporter


def losses(reporter: RecordingReporter) -> list[tuple[int, float]]:
    return [(step, values["loss"]) for step, values in reporter.metrics if "loss" in values]


def adapter(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_file(str(result.output_dir / "adapter_model.safetensors"))


def test_two_processes_with_batch_2_train_as_one_process_with_batch_4(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    # fp32 whatever the CPU: the two ways of summing a batch agree to fp32 rounding, while in
    # bf16 each rounds differently (losses 7.50602 and 7.50440 at one step on a bf16 CPU).
    group_settings = group_settings.model_copy(deep=True)
    group_settings.training.cpu_bf16 = "off"
    pair, pair_reports = on_two(make_request, group_settings, tmp_path / "pair",
                                micro_batch_size=2)
    one_reports = RecordingReporter()
    one = run_job(make_request(training={"micro_batch_size": 4, **SAME_STEPS}),
                  tmp_path / "one", one_reports, group_settings)

    assert pair.steps == one.steps == 6
    assert "process group: 2 ranks, DDP over gloo" in pair_reports.lines
    assert any("batch 2 x 1 x 2 devices" in line for line in pair_reports.lines)
    assert "base model loaded in torch.float32" in pair_reports.lines
    pair_losses, one_losses = losses(pair_reports), losses(one_reports)
    assert [step for step, _ in pair_losses] == [step for step, _ in one_losses]
    # The token accuracy is counted over both ranks' batches: the one process's.
    for key in ("mean_token_accuracy", "eval_mean_token_accuracy"):
        assert pair_reports.steps(key) == one_reports.steps(key) != []
        assert pair_reports.values(key) == pytest.approx(one_reports.values(key), abs=1e-3)
    for (_, two), (_, single) in zip(pair_losses, one_losses, strict=True):
        assert two == pytest.approx(single, rel=1e-4)
    two_weights, one_weights = adapter(pair), adapter(one)
    assert two_weights.keys() == one_weights.keys()
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, rtol=1e-3, atol=1e-5)
    # Rank 0 reported the rest as one process does: phases, checkpoints, tokens.
    assert pair_reports.phases == ["loading_data", "loading_model", "training"]
    assert pair_reports.checkpoints == [2, 4, 6]
    assert pair.trained_tokens == one.trained_tokens


def test_qlora_trains_on_two_processes_each_holding_the_4bit_model(
    tiny_model_dir: Path, group_settings: Settings, tmp_path: Path
) -> None:
    from tests.worker.conftest import build_request

    request = build_request(tiny_model_dir, model={"use_quantization": True},
                            training={"devices": 2, "micro_batch_size": 2, **SAME_STEPS})
    reporter = RecordingReporter()
    result = train_on_devices(request, tmp_path / "work", reporter, group_settings,
                              claim=Claim("job-qlora", 1, "worker-test"), memory_rung=0,
                              hub_cache_dir=None)
    assert result.steps == 6
    assert "process group: 2 ranks, DDP over gloo" in reporter.lines
    assert any(line.startswith("base model loaded in 4-bit NF4") for line in reporter.lines)
    assert set(adapter(result)) and result.last_loss is not None


def test_cancel_stops_both_processes_at_the_same_step(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    reporter = RecordingReporter(stop_after_step=2)
    with pytest.raises(TrainingStopped) as stopped:
        on_two(make_request, group_settings, tmp_path / "work", reporter=reporter,
               micro_batch_size=1, num_train_epochs=3)
    assert stopped.value.reason is StopReason.CANCELLED
    # The request reaches the group while it trains its next step or the one after; the
    # ranks agree on it at that step's end, far from the run's 72.
    assert stopped.value.step is not None and 2 <= stopped.value.step <= 5
    assert max(step for step, _ in losses(reporter)) == stopped.value.step
    assert not rank_processes(tmp_path / "work")


def test_a_pause_saves_the_step_it_stops_at_and_the_next_attempt_resumes_there(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    reporter = RecordingReporter()
    reporter.metric = stop_at_step(reporter, 3, StopReason.PAUSED)  # type: ignore[method-assign]
    with pytest.raises(TrainingStopped) as stopped:
        on_two(make_request, group_settings, tmp_path / "first", reporter=reporter,
               job_id="job-paused", micro_batch_size=1, num_train_epochs=2)
    step = stopped.value.step
    assert stopped.value.reason is StopReason.PAUSED and step is not None
    assert reporter.checkpoints[-1] == step  # the step it stopped at, saved

    result, resumed = on_two(make_request, group_settings, tmp_path / "second",
                             job_id="job-paused", attempt=2, micro_batch_size=1,
                             num_train_epochs=2)
    assert result.steps == 24
    assert any(f"resuming at step {step}" in line for line in resumed.lines)
    assert min(s for s, _ in losses(resumed)) == step + 1


def test_a_killed_rank_fails_the_attempt_and_the_next_one_resumes_from_its_checkpoint(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    work = tmp_path / "first"
    reporter = RecordingReporter()
    killed = signal_rank_1_after(reporter, work, after=3, sig=signal.SIGKILL)
    # Rank 0 dies by torchrun's SIGTERM, or first fails on the lost peer: either way, no
    # outcome of the job's own.
    with pytest.raises(ProcessGroupFailed, match="exited with status|a rank crashed"):
        on_two(make_request, group_settings, work, reporter=reporter, job_id="job-killed",
               micro_batch_size=1, num_train_epochs=2)
    assert killed and not rank_processes(work)
    # Every rank had read the spec: its secrets were deleted while the group trained.
    assert not (work / "group" / "spec.json").exists()
    stored = storage_from_settings(group_settings).list(job_checkpoint_prefix("job-killed"))
    assert any("/step-2/" in item.key for item in stored)

    result, resumed = on_two(make_request, group_settings, tmp_path / "second",
                             job_id="job-killed", attempt=2, micro_batch_size=1,
                             num_train_epochs=2)
    assert result.steps == 24  # the steps of an uninterrupted run
    resumed_at = [line for line in resumed.lines if "resuming at step" in line]
    assert resumed_at and "resuming at step 1" not in resumed_at[0]


def test_a_hung_rank_fails_the_group_after_the_collective_timeout(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    settings = group_settings.model_copy(update={"training": group_settings.training.model_copy(
        update={"process_group_timeout_s": 10})})
    work = tmp_path / "work"
    reporter = RecordingReporter()
    stopped = signal_rank_1_after(reporter, work, after=2, sig=signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(ProcessGroupFailed):
        on_two(make_request, settings, work, reporter=reporter, micro_batch_size=1,
               num_train_epochs=2)
    # The timeout, then torchrun's teardown; far from the run's end, never forever.
    assert stopped and time.monotonic() - started < 240
    assert not rank_processes(work)


def test_rank_0_stops_the_group_as_from_a_lost_lease_when_its_worker_goes_silent(
    tmp_path: Path,
) -> None:
    writer = EventWriter(tmp_path, lease_seconds=30)
    assert writer.should_stop() is None  # no worker watching yet: nothing to miss
    mark_alive(tmp_path)
    assert writer.should_stop() is None
    a_lease_ago = time.time() - 31
    os.utime(tmp_path / ALIVE_FILE, (a_lease_ago, a_lease_ago))
    assert writer.should_stop() is StopReason.LEASE_LOST
    request_stop(tmp_path, StopReason.CANCELLED)
    assert writer.should_stop() is StopReason.CANCELLED  # what the worker asked wins


def test_a_group_stopped_by_its_silent_worker_loses_the_attempt(
    make_request: Any, group_settings: Settings, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's heartbeat still holds the lease, but the worker stopped answering its
    group for longer than a lease (as after a SIGSTOP): the attempt is lost, not the job's."""
    def silent_for_an_hour(directory: Path) -> None:
        an_hour_ago = time.time() - 3600
        (directory / ALIVE_FILE).touch()
        os.utime(directory / ALIVE_FILE, (an_hour_ago, an_hour_ago))

    monkeypatch.setattr("worker.device_group.mark_alive", silent_for_an_hour)
    reporter = RecordingReporter()
    with pytest.raises(ProcessGroupFailed, match="its worker did not answer for a lease"):
        on_two(make_request, group_settings, tmp_path / "work", reporter=reporter)
    # Rank 0 saw the silence as soon as it first asked, while loading, and the group ended.
    assert "training" not in reporter.phases
    assert not rank_processes(tmp_path / "work")


def test_the_reports_of_a_group_whose_lease_is_not_held_are_dropped(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    reporter = RecordingReporter()
    request = make_request(training={"devices": 2, **SAME_STEPS})
    result = train_on_devices(request, tmp_path / "work", reporter, group_settings,
                              claim=Claim("job-stale", 1, "worker-test"), memory_rung=0,
                              hub_cache_dir=None, lease_held=lambda: False)
    assert result.steps > 0
    assert reporter.metrics == [] and reporter.checkpoints == []
    assert reporter.lines == [line for line in reporter.lines if line.startswith("devices: ")]


def test_fsdp_on_a_cpu_worker_is_refused_naming_the_field(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs: FSDP runs there")
    with pytest.raises(PipelineError, match="training_config.strategy 'fsdp' needs 2 GPUs"):
        on_two(make_request, group_settings, tmp_path / "work", strategy="fsdp")


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="FSDP needs two GPUs (bench/gpu/multi_device.sh runs this on one)")
def test_fsdp_on_two_gpus_trains_as_ddp_does(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    ddp, ddp_reports = on_two(make_request, group_settings, tmp_path / "ddp",
                              job_id="job-ddp", micro_batch_size=2)
    fsdp, fsdp_reports = on_two(make_request, group_settings, tmp_path / "fsdp",
                                job_id="job-fsdp", micro_batch_size=2, strategy="fsdp")
    assert "process group: 2 ranks, FSDP over nccl" in fsdp_reports.lines
    assert fsdp.steps == ddp.steps
    for (_, sharded), (_, whole_model) in zip(losses(fsdp_reports), losses(ddp_reports),
                                              strict=True):
        assert sharded == pytest.approx(whole_model, rel=1e-2)
    for name, weight in adapter(ddp).items():
        torch.testing.assert_close(adapter(fsdp)[name], weight, rtol=1e-2, atol=1e-3)


def test_a_job_asking_more_devices_than_the_worker_owns_is_refused(
    make_request: Any, group_settings: Settings, tmp_path: Path
) -> None:
    one_device = group_settings.model_copy(
        update={"training": group_settings.training.model_copy(update={"worker_devices": 1})})
    with pytest.raises(PipelineError, match="TUNERY_WORKER_DEVICES"):
        on_two(make_request, one_device, tmp_path / "work")


def test_a_guarded_command_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """What takes a job's process group down with a worker killed by SIGKILL."""
    marker = tmp_path / "guarded.pid"
    guarded_script = tmp_path / "guarded.py"
    guarded_script.write_text(
        f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(300)\n")
    starter_script = tmp_path / "starter.py"
    starter_script.write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-m', 'worker.parent_death', sys.executable, "
        f"{str(guarded_script)!r}])\n"
        "time.sleep(300)\n")
    starter = subprocess.Popen([sys.executable, str(starter_script)],
                               cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text()):
            assert time.monotonic() < deadline, "the guarded command never started"
            time.sleep(0.1)
        guarded = int(marker.read_text())
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 10
        while alive(guarded):
            assert time.monotonic() < deadline, "the guarded command outlived its parent"
            time.sleep(0.1)
    finally:
        starter.kill()


def signal_rank_1_after(reporter: RecordingReporter, work_dir: Path, *, after: int,
                        sig: signal.Signals) -> list[int]:
    """Have `reporter` send `sig` to rank 1 of the group in `work_dir` once the loss of
    step `after` is reported; the list gets the pid signalled."""
    signalled: list[int] = []

    def metric(step: int, values: dict[str, float]) -> None:
        RecordingReporter.metric(reporter, step, values)
        if step >= after and "loss" in values and not signalled:
            pid = rank_processes(work_dir)[1]
            os.kill(pid, sig)
            signalled.append(pid)

    reporter.metric = metric  # type: ignore[method-assign]
    return signalled


def stop_at_step(reporter: RecordingReporter, at: int, reason: StopReason) -> Any:
    def metric(step: int, values: dict[str, float]) -> None:
        RecordingReporter.metric(reporter, step, values)
        if step >= at:
            reporter.request_stop(reason)
    return metric


def rank_processes(work_dir: Path) -> dict[int, int]:
    """rank -> pid of the live `worker.rank_main` processes of the group in `work_dir`."""
    group = str(work_dir / "group")
    ranks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if b"worker.rank_main" not in command or group.encode() not in command:
                continue
            if (entry / "stat").read_text().split()[2] == "Z":
                continue
            env = dict(item.split(b"=", 1) for item in
                       (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if b"RANK" in env:  # not torchrun, whose command line names the module too
            ranks[int(env[b"RANK"])] = int(entry.name)
    return ranks


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"
