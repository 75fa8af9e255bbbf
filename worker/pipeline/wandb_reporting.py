"""Reporting a training run to Weights & Biases, as `logging_config.use_wandb` asks.

transformers' `WandbCallback` (`report_to=["wandb"]`) does the reporting; it and `wandb.init`
read their settings from the environment. The environment is the worker's, shared by every
job it runs, so the job's values (the login key among them) are set only while the Trainer
runs and the previous values are put back after, whatever happens.

The run is started here, before the Trainer (which then reports into it), with a bound on
how long W&B may take to answer (`TUNERY_WANDB_INIT_TIMEOUT_S`): W&B's default waits 90 s
for a server that does not answer, and the worker, which runs one job at a time, would wait
with it. A run that does not start fails the job with a reason that says so.

Finishing is bounded too (`TUNERY_WANDB_FINISH_TIMEOUT_S`): W&B gives up uploading after its
`finish_timeout`, but its teardown then waits for its service process with no bound, and a
service wedged on a server that never answers (or stopped) would hold the worker for good.
Past the bound the worker kills the service process, which ends that wait.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.schema import LoggingConfig
from worker.pipeline.errors import PipelineError, StopReason
from worker.pipeline.interrupts import InterruptibleRegion, ShouldStop
from worker.pipeline.report import LogFn, no_log

TEARDOWN_GRACE_S = 10.0
"""Beyond W&B's own finish timeout: for its service process to exit once told to, and for
the teardown to end once the process is killed."""


@dataclass(frozen=True)
class WandbTimeouts:
    """How long a job waits on W&B: for its run to start, and for it to finish (upload the
    last data and stop W&B's service process) before the worker stops the service itself."""

    start_s: float
    finish_s: float


def wandb_environment(
    config: LoggingConfig, run_dir: Path, init_timeout_s: float | None = None
) -> dict[str, str]:
    """The variables `wandb.init` reads, from the request's logging_config."""
    env = {
        "WANDB_PROJECT": config.wandb_project,
        # Run files go to the job's work dir, which the worker deletes after the job, rather
        # than to ./wandb of the worker process.
        "WANDB_DIR": str(run_dir),
        # W&B would otherwise capture the worker's whole stdout/stderr into the user's run.
        "WANDB_CONSOLE": "off",
    }
    if config.wandb_username:
        env["WANDB_ENTITY"] = config.wandb_username
    if config.wandb_login_key:
        env["WANDB_API_KEY"] = config.wandb_login_key
    if init_timeout_s is not None:
        env["WANDB_INIT_TIMEOUT"] = f"{init_timeout_s:g}"
    return env


@contextmanager
def wandb_reporting(
    config: LoggingConfig | None, run_dir: Path, *, timeouts: WandbTimeouts,
    log: LogFn = no_log, should_stop: ShouldStop | None = None,
) -> Iterator[None]:
    """Around `trainer.train()`: the job's W&B settings in the environment, its run started
    (waiting at most `timeouts.start_s`) and finished afterwards (waiting at most about
    `timeouts.finish_s`). Does nothing unless `config.use_wandb`.

    A W&B error (bad key, unknown entity, no network, no answer in time) becomes a
    `PipelineError` that never shows the key. While the run starts, a stop that
    `should_stop` reports (a cancel) interrupts the wait with `TrainingStopped`.
    """
    if config is None or not config.use_wandb:
        yield
        return
    import wandb

    init_timeout_s = timeouts.start_s
    env = wandb_environment(config, run_dir, init_timeout_s)
    saved = {name: os.environ.get(name) for name in env}
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    entity = f"{config.wandb_username}/" if config.wandb_username else ""
    log(f"reporting to Weights & Biases: project {entity}{config.wandb_project}")
    try:
        try:
            # WandbCallback reports into the run started here rather than starting its own.
            # Start-up waits on W&B's servers for up to init_timeout_s: a cancel must not.
            with InterruptibleRegion(should_stop or _never_stop):
                wandb.init(project=config.wandb_project, name=config.wandb_run_name or None,
                           settings=wandb.Settings(init_timeout=init_timeout_s,
                                                   finish_timeout=timeouts.finish_s))
        except wandb.errors.Error as exc:
            message = _without_key(str(exc), config)
            if "timed out" in message.lower():
                raise PipelineError(
                    f"Weights & Biases did not answer within {init_timeout_s:g} s ({message})"
                ) from None
            raise PipelineError(f"Weights & Biases reporting failed: {message}") from None
        log("Weights & Biases run started")
        yield
    except wandb.errors.Error as exc:
        message = _without_key(str(exc), config)
        raise PipelineError(f"Weights & Biases reporting failed: {message}") from None
    finally:
        try:
            _finish_within(wandb, timeouts.finish_s, log, config)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _finish_within(wandb: Any, finish_s: float, log: LogFn, config: LoggingConfig) -> None:
    """`wandb.finish()` then `wandb.teardown()`, in a thread the worker waits on for at most
    `finish_s` + grace before it kills W&B's service process (which ends the teardown's wait).

    WandbCallback leaves the run open, and the next job in this process would log into it;
    teardown also stops W&B's service process, which holds the job's settings. An error
    while finishing is logged, not raised: the training it reported on is done.
    """
    service = _service_process(wandb)
    errors: list[BaseException] = []

    def finish() -> None:
        # Teardown even when finishing fails (as it does once the service is killed): it is
        # what drops the dead service, so that the next job's run starts a new one.
        for step in (wandb.finish, wandb.teardown):
            try:
                step()
            except BaseException as exc:  # reported below, from the job's thread
                errors.append(exc)

    thread = threading.Thread(target=finish, name="wandb-finish", daemon=True)
    thread.start()
    thread.join(finish_s + TEARDOWN_GRACE_S)
    if thread.is_alive():
        if service is not None:
            service.kill()
            thread.join(TEARDOWN_GRACE_S)
        log(f"Weights & Biases did not finish within {finish_s:g} s: its service process was "
            "stopped, and the run's last data may be missing in W&B")
    for exc in errors:
        message = _without_key(str(exc), config) or type(exc).__name__
        log(f"Weights & Biases could not finish the run: {message}")


def _service_process(wandb: Any) -> subprocess.Popen[bytes] | None:
    """W&B's service process, if this process started it. W&B has no public handle on it, so
    this reads its private attributes and gives None when they are not where expected."""
    singleton = getattr(wandb.sdk.wandb_setup, "_singleton", None)
    connection = getattr(singleton, "_connection", None)
    process = getattr(getattr(connection, "_proc", None), "_process", None)
    return process if isinstance(process, subprocess.Popen) else None


def _without_key(message: str, config: LoggingConfig) -> str:
    if config.wandb_login_key:
        message = message.replace(config.wandb_login_key, "***")
    return message


def _never_stop() -> StopReason | None:
    return None
