"""Checkpoints written under the legacy layout, ``jobs/{job_id}/checkpoints/step-N/``, before
they got their own prefix: still resumed from, pruned and deleted, in a local storage directory
and on an S3-compatible endpoint. The keys are spelled out here on purpose: they are what
storage written by the earlier release holds, whatever `shared.storage_keys` says today."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.storage import LocalStorage, S3Storage, Storage
from shared.storage_keys import job_checkpoint_prefix
from worker.pipeline.checkpoints import (
    MARKER,
    CheckpointStore,
    download_initial_adapter,
    download_resume_checkpoint,
    list_checkpoints,
)

JOB = "job-old"
FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt")


@pytest.fixture(params=["local", "s3"])
def storage(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "storage")
        return
    endpoint = request.getfixturevalue("s3_endpoint_url")
    credentials = request.getfixturevalue("s3_credentials")
    store = S3Storage(
        f"tunery-test-{uuid.uuid4().hex[:12]}", "root", endpoint_url=endpoint, **credentials
    )
    store.ensure_bucket()
    yield store


def write_legacy_checkpoint(storage: Storage, step: int, *, marker: bool = True) -> None:
    """What the earlier release's `upload_checkpoint` wrote."""
    prefix = f"jobs/{JOB}/checkpoints/step-{step}/"
    files = {}
    for name in FILES:
        data = f"{name} at {step}".encode()
        storage.put_bytes(prefix + name, data)
        files[name] = len(data)
    if marker:
        storage.put_bytes(prefix + MARKER, json.dumps({"step": step, "files": files}).encode())


def write_local_checkpoint(tmp: Path, step: int) -> Path:
    local = tmp / f"checkpoint-{step}"
    local.mkdir(parents=True)
    for name in FILES:
        (local / name).write_bytes(f"{name} at {step} (new)".encode())
    return local


def keys(storage: Storage, prefix: str) -> set[str]:
    return {obj.key for obj in storage.list(prefix)}


def test_a_job_resumes_from_its_legacy_checkpoint(storage: Storage, tmp_path: Path) -> None:
    write_legacy_checkpoint(storage, 2)
    write_legacy_checkpoint(storage, 4)
    write_legacy_checkpoint(storage, 6, marker=False)  # cut off mid-upload

    store = CheckpointStore(storage, JOB)
    latest = store.latest()
    resumed = download_resume_checkpoint(store, tmp_path / "resume")

    assert [c.step for c in list_checkpoints(storage, JOB)] == [2, 4]
    assert latest is not None and latest.prefix == f"jobs/{JOB}/checkpoints/step-4/"
    assert resumed is not None
    assert (resumed / "optimizer.pt").read_bytes() == b"optimizer.pt at 4"


def test_a_new_job_continues_from_a_legacy_checkpoint_it_names(
    storage: Storage, tmp_path: Path
) -> None:
    write_legacy_checkpoint(storage, 2)

    adapter = download_initial_adapter(
        storage, f"jobs/{JOB}/checkpoints/step-2", tmp_path / "initial"
    )

    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (adapter / "adapter_config.json").read_bytes() == b"adapter_config.json at 2"


def test_new_checkpoints_go_apart_and_pruning_reaches_the_legacy_ones(
    storage: Storage, tmp_path: Path
) -> None:
    write_legacy_checkpoint(storage, 2)
    write_legacy_checkpoint(storage, 4)
    write_legacy_checkpoint(storage, 5, marker=False)
    store = CheckpointStore(storage, JOB, keep=2)

    stored = store.upload(6, write_local_checkpoint(tmp_path, 6))

    assert stored.prefix == f"{job_checkpoint_prefix(JOB)}step-6/"
    assert stored.prefix == f"checkpoints/{JOB}/step-6/"
    assert [(c.step, c.prefix) for c in list_checkpoints(storage, JOB)] == [
        (4, f"jobs/{JOB}/checkpoints/step-4/"),
        (6, f"checkpoints/{JOB}/step-6/"),
    ]
    # Nothing writes the legacy layout any more: the incomplete step 5 there is debris.
    assert {k.split("/")[3] for k in keys(storage, f"jobs/{JOB}/checkpoints/")} == {"step-4"}
    latest = store.latest()
    assert latest is not None and latest.step == 6


def test_a_step_under_both_layouts_is_read_from_the_current_one(
    storage: Storage, tmp_path: Path
) -> None:
    write_legacy_checkpoint(storage, 4)
    CheckpointStore(storage, JOB, keep=2).upload(4, write_local_checkpoint(tmp_path, 4))

    [checkpoint] = list_checkpoints(storage, JOB)

    assert checkpoint.prefix == f"checkpoints/{JOB}/step-4/"


def test_deleting_a_jobs_checkpoints_removes_both_layouts_and_keeps_its_adapter(
    storage: Storage, tmp_path: Path
) -> None:
    write_legacy_checkpoint(storage, 2)
    store = CheckpointStore(storage, JOB)
    store.upload(4, write_local_checkpoint(tmp_path, 4))
    storage.put_bytes(f"jobs/{JOB}/adapter_model.safetensors", b"final")

    store.delete_all()

    assert keys(storage, f"jobs/{JOB}/checkpoints/") == set()
    assert keys(storage, f"checkpoints/{JOB}/") == set()
    assert keys(storage, f"jobs/{JOB}/") == {f"jobs/{JOB}/adapter_model.safetensors"}
