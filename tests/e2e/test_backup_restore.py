"""The backup the README describes, on the embedded stack: the SQLite file (copied online with
SQLite's backup API), the storage directory and the secret key, restored into a new stack
process with an otherwise fresh data dir, serve the old job and its adapter byte for byte."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from cli.local_stack import LocalStack
from tests.conftest import ASSETS_DIR
from tests.e2e.conftest import (
    create_key,
    download_artifacts,
    stack_env,
    tiny_payload,
    wait_for_terminal,
)


def backup_sqlite(source: Path, dest: Path) -> None:
    """What `sqlite3 tunery.db ".backup dest"` does: a consistent copy while writers run."""
    with sqlite3.connect(source) as live, sqlite3.connect(dest) as copy:
        live.backup(copy)


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_backup_of_database_storage_and_secret_key_restores_the_job_and_its_adapter(
        tmp_path: Path, tiny_model_dir: Path, start_stack: Callable[..., LocalStack]) -> None:
    data = tmp_path / "data"
    allowed = [ASSETS_DIR, tiny_model_dir]
    # The operator's key, kept apart from the data as the README says.
    secret_key = Fernet.generate_key().decode()
    env = stack_env(data, allowed, TUNERY_RATE_LIMIT_PER_MINUTE="0",
                    TUNERY_SECRET_KEY=secret_key)
    first = start_stack(env)
    key = create_key(env)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=first.base_url, headers=auth, timeout=60) as client:
        submitted = client.post("/v1/finetune/llm", json=tiny_payload(tiny_model_dir))
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]
        job = wait_for_terminal(client, job_id)
        assert job["status"] == "COMPLETED", job
        names = download_artifacts(client, job_id, tmp_path / "before")

        backup = tmp_path / "backup"
        backup.mkdir()
        backup_sqlite(data / "tunery.db", backup / "tunery.db")
        shutil.copytree(data / "storage", backup / "storage")
    first.stop()

    restored_env = stack_env(
        tmp_path / "fresh", allowed, TUNERY_RATE_LIMIT_PER_MINUTE="0",
        TUNERY_DATABASE_URL=f"sqlite:///{backup / 'tunery.db'}",
        TUNERY_STORAGE_URL=(backup / "storage").as_uri(),
        TUNERY_SECRET_KEY=secret_key,
    )
    restored = start_stack(restored_env)
    # The same API key: keys live in the database, hashed.
    with httpx.Client(base_url=restored.base_url, headers=auth, timeout=60) as client:
        again = client.get(f"/v1/finetune/llm/{job_id}")
        assert again.status_code == 200, again.text
        assert {k: again.json()[k] for k in ("status", "result", "finished_at")} == {
            k: job[k] for k in ("status", "result", "finished_at")}
        assert download_artifacts(client, job_id, tmp_path / "after") == names

    assert "adapter_model.safetensors" in names
    assert files_under(tmp_path / "after") == files_under(tmp_path / "before")
    assert not (tmp_path / "fresh" / "storage" / "jobs").exists()
