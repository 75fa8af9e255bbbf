"""deploy/systemd: the units pass `systemd-analyze verify` (warnings included) and keep the
promises the README makes: a worker gets SIGTERM alone and two minutes to save its step,
both restart on failure and read one environment file."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import PROJECT_ROOT

UNITS_DIR = PROJECT_ROOT / "deploy" / "systemd"
UNITS = ("tunery-api.service", "tunery-worker.service")
# Where the units expect Tunery's venv (README: "Production without containers").
INSTALLED_BIN = "/opt/tunery/.venv/bin/"
ENV_FILE = "/etc/tunery/tunery.env"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are CamelCase
    parser.read(UNITS_DIR / name)
    return parser


def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        # Debian images without systemd (some CI containers) lack it; this machine and the
        # project's CI have it, so there the test runs.
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`)")
    # verify checks that ExecStart's program exists: point it at this installation's `tunery`.
    this_bin = f"{Path(sys.executable).parent}/"
    assert (Path(this_bin) / "tunery").exists()
    for name in UNITS:
        text = (UNITS_DIR / name).read_text()
        assert INSTALLED_BIN in text
        (tmp_path / name).write_text(text.replace(INSTALLED_BIN, this_bin))

    result = subprocess.run([binary, "verify", *(str(tmp_path / name) for name in UNITS)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    # Unknown or misspelt keys are only warned about, with the unit's path: none may be.
    problems = [line for line in result.stderr.splitlines()
                if str(tmp_path) in line or any(name in line for name in UNITS)]
    assert problems == []


def test_worker_gets_sigterm_alone_and_two_minutes_to_save_its_step() -> None:
    service = unit("tunery-worker.service")["Service"]
    assert service["ExecStart"] == f"{INSTALLED_BIN}tunery worker"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert service["TimeoutStopSec"] == "120"


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_restarts_on_failure_and_reads_the_environment_file(name: str) -> None:
    service = unit(name)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == ENV_FILE
    assert service["User"] == "tunery"


def test_api_migrates_once_before_its_processes_start() -> None:
    service = unit("tunery-api.service")["Service"]
    assert service["ExecStartPre"] == f"{INSTALLED_BIN}tunery db upgrade"
    assert service["ExecStart"].startswith(f"{INSTALLED_BIN}tunery api ")
    assert "--workers" in service["ExecStart"]
    example = (UNITS_DIR / "tunery.env.example").read_text().splitlines()
    assert "TUNERY_AUTO_MIGRATE=false" in example


def test_the_example_environment_file_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from shared.settings import settings_problems

    for name in list(os.environ):
        if name.upper().startswith("TUNERY_"):
            monkeypatch.delenv(name)
    for line in (UNITS_DIR / "tunery.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("=", 1)
            # systemd takes a single-quoted value literally and drops the quotes.
            if value.startswith("'") and value.endswith("'"):
                value = value[1:-1]
            monkeypatch.setenv(name, value)

    assert settings_problems() == []
