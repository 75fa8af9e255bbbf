"""Reporting a training run to Weights & Biases, as `logging_config.use_wandb` asks.

transformers' `WandbCallback` (`report_to=["wandb"]`) does the reporting; it and `wandb.init`
read their settings from the environment. The environment is the worker's, shared by every
job it runs, so the job's values (the login key among them) are set only while the Trainer
runs and the previous values are put back after, whatever happens.

The run is started here, before the Trainer (which then reports into it), with a bound on
how long W&B may take to answer (`TUNERY_WANDB_INIT_TIMEOUT_S`): W&B's default waits 90 s
for a server that does not answer, and the worker, which runs one job at a time, would wait
with it. A run that does not start fails the job with a reason that says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.schema import LoggingConfig
from worker.pipeline.errors import PipelineError, StopReason
from worker.pipeline.interrupts import InterruptibleRegion, ShouldStop
from worker.pipeline.report import LogFn, no_log


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
    config: LoggingConfig | None, run_dir: Path, *, init_timeout_s: float,
    log: LogFn = no_log, should_stop: ShouldStop | None = None,
) -> Iterator[None]:
    """Around `trainer.train()`: the job's W&B settings in the environment, its run started
    (waiting at most `init_timeout_s`, the worker's `TUNERY_WANDB_INIT_TIMEOUT_S`) and finished
    afterwards. Does nothing unless `config.use_wandb`.

    A W&B error (bad key, unknown entity, no network, no answer in time) becomes a
    `PipelineError` that never shows the key. While the run starts, a stop that
    `should_stop` reports (a cancel) interrupts the wait with `TrainingStopped`.
    """
    if config is None or not config.use_wandb:
        yield
        return
    import wandb

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
                           settings=wandb.Settings(init_timeout=init_timeout_s))
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
            # WandbCallback leaves the run open; the next job in this process would log into
            # it. Teardown also stops W&B's service process, which holds the job's settings.
            wandb.finish()
            wandb.teardown()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _without_key(message: str, config: LoggingConfig) -> str:
    if config.wandb_login_key:
        message = message.replace(config.wandb_login_key, "***")
    return message


def _never_stop() -> StopReason | None:
    return None
