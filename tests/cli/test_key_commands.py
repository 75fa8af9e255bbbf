"""`tunery keys create | list | revoke`: clean answers on a fresh data dir, never a secret in
a listing, and every answer says which data dir (or database) it read."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shared.db import session_scope
from shared.keys import authenticate
from tests.cli.conftest import Tunery


def created_key(tunery: Tunery, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert tunery("keys", "create", "--quiet", *args) == 0
    return capsys.readouterr().out.strip()


def listed_rows(tunery: Tunery, capsys: pytest.CaptureFixture[str]) -> list[list[str]]:
    assert tunery("keys", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    return [line.split() for line in lines[2:]]


def test_keys_list_on_a_fresh_data_dir_says_there_are_none_and_where(
        tunery: Tunery, tunery_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tunery("keys", "list") == 0

    out = capsys.readouterr()
    assert out.out.startswith("no keys yet in the data dir ")
    assert f"{tunery_env.resolve()} (TUNERY_DATA_DIR)" in out.out
    assert out.err == ""


def test_keys_revoke_on_a_fresh_data_dir_says_there_is_no_such_key(
        tunery: Tunery, capsys: pytest.CaptureFixture[str]) -> None:
    assert tunery("keys", "revoke", "0f1e2d3c-no-such-key") == 1

    err = capsys.readouterr().err
    assert "no key with id or prefix '0f1e2d3c-no-such-key'" in err
    assert "Traceback" not in err


def test_keys_list_shows_every_key_and_its_state_but_never_its_secret(
        tunery: Tunery, tunery_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice = created_key(tunery, capsys, "--name", "alice")
    ops = created_key(tunery, capsys, "--name", "ops", "--tenant", "acme", "--admin")
    prefix = alice.split("_")[1]
    assert tunery("keys", "revoke", prefix) == 0
    capsys.readouterr()

    assert tunery("keys", "list") == 0
    out = capsys.readouterr().out
    header, columns, *rows = out.splitlines()

    assert header == f"keys in the data dir {tunery_env.resolve()} (TUNERY_DATA_DIR):"
    assert columns.split()[:5] == ["id", "prefix", "name", "role", "tenant"]
    (alice_row,) = [row.split() for row in rows if " alice " in row]
    (ops_row,) = [row.split() for row in rows if " ops " in row]
    assert alice_row[1:5] == [prefix, "alice", "member", "alice"]
    assert ops_row[1:5] == [ops.split("_")[1], "ops", "admin", "acme"]
    assert alice_row[-1] != "-" and ops_row[-1] == "-"  # revoked at, or not revoked
    for key in (alice, ops):
        assert key.split("_")[2] not in out


def test_keys_revoke_takes_the_id_keys_list_shows(
        tunery: Tunery, capsys: pytest.CaptureFixture[str]) -> None:
    key = created_key(tunery, capsys, "--name", "ci")
    (row,) = listed_rows(tunery, capsys)

    assert tunery("keys", "revoke", row[0]) == 0
    assert f"revoked key {row[0]}" in capsys.readouterr().out
    with session_scope() as session:
        assert authenticate(session, key) is None
    assert tunery("keys", "revoke", row[0]) == 1
    assert "already revoked" in capsys.readouterr().out


def test_keys_create_says_which_data_dir_knows_the_key(
        tunery: Tunery, tunery_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tunery("keys", "create", "--name", "me") == 0

    out = capsys.readouterr().out.splitlines()
    assert f"in the data dir {tunery_env.resolve()} (TUNERY_DATA_DIR)" in out[0]
    assert out[-1].startswith("tun_")


def test_a_key_this_server_does_not_know_gets_a_pointer_to_keys_list(tunery_env: Path) -> None:
    from api.main import create_app

    with TestClient(create_app()) as client:
        response = client.get("/v1/finetune/llm",
                              headers={"Authorization": "Bearer tun_0123456789ab_notakey"})

    assert response.status_code == 401
    message = response.json()["error"]["message"]
    assert message.startswith("invalid or revoked API key")
    assert "`tunery keys list`" in message
    assert str(tunery_env) not in message  # nothing about this server's layout
