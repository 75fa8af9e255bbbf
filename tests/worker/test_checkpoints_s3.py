"""Checkpoints through S3Storage against a real S3-compatible HTTP endpoint (moto's server),
as a production worker writes them to MinIO or S3: uploaded every N steps, pruned to the
latest K, and resumed by a later attempt with the same steps as an uninterrupted run."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from shared.storage import S3Storage
from worker.pipeline.checkpoints import CheckpointStore, find_latest_checkpoint, list_checkpoints
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job


@pytest.fixture
def s3(s3_endpoint_url: str, s3_credentials: dict[str, str]) -> S3Storage:
    store = S3Storage(
        f"tunery-ckpt-{uuid.uuid4().hex[:12]}", "root", endpoint_url=s3_endpoint_url,
        **s3_credentials,
    )
    store.ensure_bucket()
    return store


def test_a_stopped_job_resumes_from_its_s3_checkpoint(
    s3: S3Storage, settings: Settings, tmp_path: Path, make_request: Any
) -> None:
    store = CheckpointStore(s3, "job-s3", every_steps=2, keep=2)
    # Stop is asked while step 5 is reported: training stops after step 6, whose save is
    # skipped, so the latest checkpoint in the bucket is step 4's.
    first = RecordingReporter(stop_after_step=5)
    with pytest.raises(TrainingStopped):
        run_job(make_request(training={"num_train_epochs": 2}), tmp_path / "a", first,
                settings, store)
    assert [c.step for c in list_checkpoints(s3, "job-s3")] == [2, 4]
    latest = find_latest_checkpoint(s3, "job-s3")
    assert latest is not None and "optimizer.pt" in latest.files

    second = RecordingReporter()
    store = replace(store, attempt=2)  # the attempt that resumes
    result = run_job(make_request(training={"num_train_epochs": 2}), tmp_path / "b", second,
                     settings, store)

    assert "resumed from step 4 (attempt 2)" in second.lines
    assert result.steps == 12
    assert second.steps("loss") == list(range(5, 13))
    assert [c.step for c in list_checkpoints(s3, "job-s3")] == [10, 12]
