"""`tunery demo` works in `<data dir>/demo` and deletes only a folder it made itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.demo import DEMO_MARKER, fresh_demo_dir
from tests.cli.conftest import Tunery


def test_the_demo_leaves_a_folder_it_did_not_make_alone(
        tunery: Tunery, tunery_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    someone_elses = tunery_env / "demo"
    someone_elses.mkdir(parents=True)
    (someone_elses / "tunery.db").write_text("another stack's database")

    assert tunery("demo", "--tiny") == 1

    assert (someone_elses / "tunery.db").read_text() == "another stack's database"
    out = capsys.readouterr().out
    assert f"{someone_elses} exists and was not made by `tunery demo`" in out


def test_a_folder_from_an_earlier_demo_starts_afresh(tmp_path: Path) -> None:
    first = fresh_demo_dir(tmp_path / "data" / "demo")
    (first / "logs").mkdir()
    (first / "logs" / "api.log").write_text("old run")

    again = fresh_demo_dir(tmp_path / "data" / "demo")

    assert again == first
    assert sorted(p.name for p in again.iterdir()) == [DEMO_MARKER]
    assert (again.stat().st_mode & 0o777) == 0o700
