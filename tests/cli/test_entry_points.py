"""`tunery` starts from the installed script and from `python -m cli`; children of the local
stack start the same way."""

from __future__ import annotations

import subprocess
import tomllib

from cli.process_commands import tunery_command, worker_command
from shared.settings import PROJECT_ROOT


def test_python_dash_m_cli_runs_the_tunery_command() -> None:
    done = subprocess.run(tunery_command("--help"), capture_output=True, text=True, check=True)

    assert done.stdout.startswith("usage: tunery")
    for command in ("db", "keys", "api", "worker", "up", "assets", "demo"):
        assert command in done.stdout


def test_console_script_points_at_cli_main() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]

    assert project["scripts"]["tunery"] == "cli.main:main"


def test_worker_command_runs_one_job_at_a_time_on_the_given_queue() -> None:
    argv = worker_command("train-a100")

    assert argv[argv.index("-Q") + 1] == "train-a100"
    assert argv[argv.index("--pool") + 1] == "solo"
    assert argv[argv.index("--concurrency") + 1] == "1"
