"""`tunery` starts from the installed script and from `python -m cli`; children of the local
stack start the same way."""

from __future__ import annotations

import logging
import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest

from cli.celery_worker import FirstOccurrenceOnly
from cli.local_stack import LocalStack
from cli.process_commands import tunery_command, worker_command
from shared.settings import PROJECT_ROOT, get_settings


def test_python_dash_m_cli_runs_the_tunery_command() -> None:
    done = subprocess.run(tunery_command("--help"), capture_output=True, text=True, check=True)

    assert done.stdout.startswith("usage: tunery")
    for command in ("db", "keys", "api", "worker", "up", "assets", "demo"):
        assert command in done.stdout


def test_console_script_points_at_cli_main() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]

    assert project["scripts"]["tunery"] == "cli.main:main"


def test_worker_command_runs_one_job_at_a_time_on_its_device_class_queue(
        tunery_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNERY_DEVICE_CLASSES", '[{"name": "l4", "devices": 1}, '
                                                '{"name": "a100-x4", "devices": 4}]')
    monkeypatch.setenv("TUNERY_WORKER_DEVICE_CLASS", "a100-x4")
    get_settings.cache_clear()

    argv = worker_command()

    assert argv[argv.index("-Q") + 1] == "a100-x4"
    assert argv[argv.index("--concurrency") + 1] == "1"
    # No pool named: a --pool would override the app's own, the solo pool whose cold shutdown
    # hands the job back.
    assert "--pool" not in argv and "-P" not in argv
    assert argv[argv.index("-A") + 1] == "worker.tasks"


def test_the_worker_app_runs_the_solo_pool_that_hands_a_job_back() -> None:
    from celery.concurrency import get_implementation
    from celery.concurrency.solo import TaskPool

    from worker.solo_pool import HandBackSoloPool
    from worker.tasks import app

    pool = get_implementation(app.conf.worker_pool)
    assert pool is HandBackSoloPool and issubclass(pool, TaskPool)


def test_a_quiet_worker_prints_no_banner_and_only_warnings() -> None:
    quiet, verbose = worker_command(quiet=True), worker_command()

    assert "--quiet" in quiet and "--quiet" not in verbose
    assert quiet[quiet.index("--loglevel") + 1] == "WARNING"
    assert verbose[verbose.index("--loglevel") + 1] == "INFO"


def test_a_quiet_stack_quiets_its_children_unless_the_environment_says_otherwise() -> None:
    env = {"TUNERY_LOG_LEVEL": "DEBUG", "PATH": "/usr/bin"}

    assert LocalStack(env=env).env == env  # --verbose: the environment as it is
    quiet = LocalStack(env=env, quiet=True).env
    assert quiet["TUNERY_LOG_LEVEL"] == "DEBUG"
    assert quiet["TRANSFORMERS_VERBOSITY"] == "error"
    assert quiet["PYTHONWARNINGS"].startswith("once,")


def test_the_worker_logs_each_distinct_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("py.warnings")
    once = FirstOccurrenceOnly()
    logger.addFilter(once)
    logging.captureWarnings(True)
    try:
        for _job in range(3):
            # What libraries do between jobs; it resets Python's own "once" bookkeeping.
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning,
                              stacklevel=1)
                warnings.warn("another one", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        logger.removeFilter(once)

    messages = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
    assert len(messages) == 2
    assert "is_gradient_checkpointing" in messages[0] and "another one" in messages[1]
