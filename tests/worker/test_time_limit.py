"""The per-job time limit: a job stopped by it keeps a checkpoint of the step it reached and
ends FAILED with reason timeout, naming how to continue; a cancel saves nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobStatus
from shared.settings import Settings, get_settings
from shared.storage import LocalStorage, storage_from_settings
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.checkpoints import CheckpointStore, list_checkpoints
from worker.pipeline.errors import TrainingStopped
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job
from worker.tasks import run_claimed_job


class StopsAt(RecordingReporter):
    """Asks to stop for `reason` once step `at` is reported."""

    def __init__(self, at: int, reason: str) -> None:
        super().__init__()
        self.at, self.reason = at, reason

    def metric(self, step: int, values: dict[str, float]) -> None:
        super().metric(step, values)
        if step >= self.at:
            self.request_stop(self.reason)


@pytest.mark.parametrize(("reason", "saved"), [("timeout", [2, 4]), ("cancelled", [2])])
def test_a_timeout_saves_the_step_it_stopped_at_and_a_cancel_does_not(
    settings: Settings, tmp_path: Path, make_request: Any, reason: str, saved: list[int]
) -> None:
    storage = LocalStorage(tmp_path / "storage")
    store = CheckpointStore(storage, "job", every_steps=2, keep=5)

    with pytest.raises(TrainingStopped) as stopped:
        run_job(make_request(), tmp_path / "work", StopsAt(3, reason), settings, store)

    assert stopped.value.reason == reason
    # Stop is asked while step 3 is reported, so training ends after step 4; only the
    # timeout saves that step.
    assert [c.step for c in list_checkpoints(storage, "job")] == saved


def test_a_job_past_its_soft_limit_fails_with_reason_timeout(
    tunery_env: Path, tiny_model_dir: Path, make_request: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "TUNERY_ALLOWED_LOCAL_DIRS", f'["{DATASET_PATH.parent}", "{tiny_model_dir.parent}"]'
    )
    monkeypatch.setenv("TUNERY_JOB_SOFT_TIME_LIMIT_S", "1")
    monkeypatch.setenv("TUNERY_HEARTBEAT_SECONDS", "0.2")
    monkeypatch.setenv("TUNERY_CHECKPOINT_EVERY_STEPS", "1")
    # Long enough that one second always ends it before its last step.
    request = make_request(training={"num_train_epochs": 20})
    get_settings.cache_clear()
    settings = get_settings()
    upgrade_database(settings.database.url)
    with session_scope() as session:
        tenant = create_api_key(session, "timeout").tenant_id
        job_id = jobs.create_job(session, tenant, request, max_attempts=3, device_class="train").id
        claim = jobs.claim_job(session, job_id, "w", settings.leases.lease_seconds)
    assert claim is not None

    run_claimed_job(claim, request)

    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.FAILED.value
        assert (job.error or "").startswith("timeout: the attempt ran past the time limit of 1 s")
    kept = list_checkpoints(storage_from_settings(settings), job_id)
    if kept:  # stopped during training: its checkpoint stays for a resume
        assert f"its checkpoint of step {kept[-1].step} is kept" in (job.error or "")
        assert f'resume_checkpoint_path "{job_id}"' in (job.error or "")
