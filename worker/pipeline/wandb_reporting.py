"""Reporting a training run to Weights & Biases, as `logging_config.use_wandb` asks.

transformers' `WandbCallback` (`report_to=["wandb"]`) does the reporting; it and `wandb.init`
read their settings from the environment. The environment is the worker's, shared by every
job it runs, so the job's values (the login key among them) are set only while the Trainer
runs and the previous values are put back after, whatever happens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.schema import LoggingConfig
from worker.pipeline.errors import PipelineError

LogFn = Callable[[str], None]


def _no_log(line: str) -> None:
    pass


def wandb_environment(config: LoggingConfig, run_dir: Path) -> dict[str, str]:
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
    return env


@contextmanager
def wandb_reporting(
    config: LoggingConfig | None, run_dir: Path, *, log: LogFn = _no_log
) -> Iterator[None]:
    """Around `trainer.train()`: the job's W&B settings in the environment, the run finished
    afterwards. Does nothing unless `config.use_wandb`.

    A W&B error (bad key, unknown entity, no network) becomes a `PipelineError` that never
    shows the key.
    """
    if config is None or not config.use_wandb:
        yield
        return
    import wandb

    env = wandb_environment(config, run_dir)
    saved = {name: os.environ.get(name) for name in env}
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    entity = f"{config.wandb_username}/" if config.wandb_username else ""
    log(f"reporting to Weights & Biases: project {entity}{config.wandb_project}")
    try:
        yield
    except wandb.errors.Error as exc:
        message = str(exc)
        if config.wandb_login_key:
            message = message.replace(config.wandb_login_key, "***")
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
