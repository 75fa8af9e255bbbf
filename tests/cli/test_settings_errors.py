"""An invalid `TUNERY_` variable stops every command before it starts: one line per problem,
naming the variable and the form it expects, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cli.process_commands import tunery_command
from shared.settings import LeaseSettings
from tests.cli.conftest import Tunery, clean_env


def test_a_list_setting_that_is_not_json_stops_tunery_up_in_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data", TUNERY_ALLOWED_LOCAL_DIRS="/some/dir")

    done = subprocess.run(tunery_command("up", "--port", "1"), env=env, capture_output=True,
                          text=True, timeout=60)

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == ("TUNERY_ALLOWED_LOCAL_DIRS: expected a JSON list such as "
                        "'[\"/data/models\", \"/data/datasets\"]', got '/some/dir'")
    assert len(lines) == 2  # and where the settings are documented
    assert done.stdout == ""
    assert not (tmp_path / "data").exists()  # nothing started, nothing created


def test_every_invalid_setting_gets_its_own_line(tunery: Tunery,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNERY_SOURCES__ALLOWED_PRIVATE_URL_HOSTS", "minio")
    monkeypatch.setenv("TUNERY_MAX_LORA_R", "lots")
    monkeypatch.setenv("TUNERY_MAX_EPOCHS", "-1")
    monkeypatch.setenv("TUNERY_CPU_BF16", "maybe")
    monkeypatch.setenv("TUNERY_HEARTBEAT_SECONDS", "100")

    assert tunery("keys", "list") == 2

    out = capsys.readouterr()
    assert out.out == ""
    assert sorted(out.err.splitlines()[:-1]) == [
        "TUNERY_CPU_BF16: expected 'auto', 'on' or 'off', got 'maybe'",
        "TUNERY_HEARTBEAT_SECONDS: heartbeat_seconds (100.0) must be under half of "
        f"lease_seconds ({LeaseSettings().lease_seconds}), or a slow renewal loses the lease",
        "TUNERY_MAX_EPOCHS: expected a number greater than 0, got '-1'",
        "TUNERY_MAX_LORA_R: expected a valid integer, unable to parse string as an integer, "
        "got 'lots'",
        "TUNERY_SOURCES__ALLOWED_PRIVATE_URL_HOSTS: expected a JSON list such as '[\"minio\"]', "
        "got 'minio'",
    ]
