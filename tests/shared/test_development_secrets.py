"""The compose files' development secrets are refused unless TUNERY_DEV_SECRETS says this is
development: one line naming each default in use and how to make a real one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from shared.development_secrets import (
    DEV_ENGINE_TOKEN,
    DEV_METRICS_TOKEN,
    DEV_POSTGRES_PASSWORD,
    DEV_S3_SECRET,
    DEV_SECRET_KEY,
    MAKE_A_SECRET,
)
from shared.settings import Settings, settings_problems

DEFAULTS = {
    "TUNERY_SECRET_KEY": (DEV_SECRET_KEY, "TUNERY_SECRET_KEY"),
    "TUNERY_DATABASE_URL": (f"postgresql+psycopg://tunery:{DEV_POSTGRES_PASSWORD}@db/tunery",
                            "TUNERY_DATABASE_URL's password"),
    "TUNERY_S3_SECRET_ACCESS_KEY": (DEV_S3_SECRET, "TUNERY_S3_SECRET_ACCESS_KEY"),
    "TUNERY_INFERENCE_ENGINE_TOKEN": (DEV_ENGINE_TOKEN, "TUNERY_INFERENCE_ENGINE_TOKEN"),
    "TUNERY_METRICS_TOKEN": (DEV_METRICS_TOKEN, "TUNERY_METRICS_TOKEN"),
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("TUNERY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TUNERY_DATA_DIR", str(tmp_path))
    return monkeypatch


@pytest.mark.parametrize("variable", sorted(DEFAULTS))
def test_each_development_default_is_refused_in_one_line(
        env: pytest.MonkeyPatch, variable: str) -> None:
    value, named = DEFAULTS[variable]
    env.setenv(variable, value)

    problems = settings_problems()

    assert len(problems) == 1
    assert problems[0].startswith(f"{named}")
    assert "a development default" in problems[0]
    assert MAKE_A_SECRET in problems[0] and "TUNERY_DEV_SECRETS=1" in problems[0]
    assert value not in problems[0]


def test_every_default_at_once_is_still_one_line_naming_each(env: pytest.MonkeyPatch) -> None:
    for variable, (value, _) in DEFAULTS.items():
        env.setenv(variable, value)

    problems = settings_problems()

    assert len(problems) == 1
    assert all(named in problems[0] for _, named in DEFAULTS.values())


def test_the_development_flag_accepts_them(env: pytest.MonkeyPatch) -> None:
    for variable, (value, _) in DEFAULTS.items():
        env.setenv(variable, value)
    env.setenv("TUNERY_DEV_SECRETS", "1")

    assert settings_problems() == []
    assert Settings().dev_secrets


def test_real_secrets_and_a_rotated_out_development_key_pass(env: pytest.MonkeyPatch) -> None:
    env.setenv("TUNERY_SECRET_KEY", Fernet.generate_key().decode())
    env.setenv("TUNERY_DATABASE_URL", "postgresql+psycopg://tunery:s3cr3t@db/tunery")
    env.setenv("TUNERY_S3_SECRET_ACCESS_KEY", "a-real-one")

    assert settings_problems() == []

    # Still decrypting with the development key during a rotation is still using it.
    env.setenv("TUNERY_SECRET_KEY", f"{Fernet.generate_key().decode()},{DEV_SECRET_KEY}")
    assert len(settings_problems()) == 1
