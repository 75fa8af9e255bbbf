"""Running `tunery` as a user does: in this process through `cli.main.main` (fast), or as a
real process when signals, children or the console are what is tested."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.settings import get_settings

Tunery = Callable[..., int]


@pytest.fixture
def tunery(tunery_env: Path) -> Iterator[Tunery]:
    """`tunery(*args)`: `main(args)` on the test's data dir; its exit code. The umask that
    `main` narrows is given back afterwards, so the tests after it see the usual one."""
    from cli.main import main

    umask = os.umask(0)
    os.umask(umask)

    def run(*args: str) -> int:
        try:
            return main(list(args))
        finally:
            os.umask(umask)
            get_settings.cache_clear()

    yield run


def clean_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """This environment without any `TUNERY_` variable, on `data_dir`, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TUNERY_")}
    env["TUNERY_DATA_DIR"] = str(data_dir)
    env.update(overrides)
    return env
