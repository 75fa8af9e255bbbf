"""The worker decrypts a job's secrets only to train with them, scrubs them from every failure
reason and log line (hub and W&B errors may quote the token), and fails a job it cannot
decrypt with a reason naming TUNERY_SECRET_KEY."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

import worker.pipeline.run
from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobLog, JobStatus
from shared.schema import FinetuneRequest
from shared.settings import get_settings
from worker.pipeline.errors import PipelineError
from worker.tasks import train

HF_TOKEN = "hf_" + "q" * 34
WANDB_KEY = "wk" + "z" * 38


@pytest.fixture
def submit(tunery_env: Path, make_request: Any) -> Any:
    upgrade_database(get_settings().database.url)

    def submit_job() -> str:
        request = make_request(hf={"hf_token": HF_TOKEN},
                               logging={"wandb_login_key": WANDB_KEY})
        with session_scope() as session:
            tenant_id = create_api_key(session, "owner").tenant_id
            return jobs.create_job(session, tenant_id, request, max_attempts=1,
                                   device_class="train").id

    return submit_job


def ended(job_id: str) -> tuple[Job, list[str]]:
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        lines = list(session.scalars(select(JobLog.line).where(JobLog.job_id == job_id)))
    return job, lines


def assert_scrubbed(job: Job, lines: list[str], caplog: pytest.LogCaptureFixture) -> None:
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (job.error or "", "\n".join(lines), logged, repr(job.payload)):
        assert HF_TOKEN not in text and WANDB_KEY not in text
    assert job.payload["hf_config"]["hf_token"] == "***"


@pytest.mark.parametrize("error", [PipelineError, RuntimeError])
def test_an_error_quoting_the_token_is_stored_and_logged_without_it(
    submit: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    error: type[Exception],
) -> None:
    seen: list[FinetuneRequest] = []

    def failing_run_job(request: FinetuneRequest, *args: Any, **kwargs: Any) -> Any:
        seen.append(request)
        raise error(f"401 Unauthorized for token {request.hf_config.hf_token} "
                    f"and key {request.logging_config.wandb_login_key}")

    monkeypatch.setattr(worker.pipeline.run, "run_job", failing_run_job)
    caplog.set_level(logging.DEBUG)
    job_id = submit()

    train.run(job_id)

    # The pipeline got the plaintext; nothing it said kept it.
    assert seen[0].hf_config.hf_token == HF_TOKEN
    assert seen[0].logging_config.wandb_login_key == WANDB_KEY
    job, lines = ended(job_id)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and "401 Unauthorized for token *** and key ***" in job.error
    assert any("token ***" in line for line in lines)
    assert_scrubbed(job, lines, caplog)


def test_a_worker_with_another_key_fails_the_job_naming_the_setting(
    submit: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TUNERY_SECRET_KEY", Fernet.generate_key().decode())
    get_settings.cache_clear()
    job_id = submit()
    with session_scope() as session:
        ciphertext = session.get_one(Job, job_id).payload["hf_config"]["hf_token"]
    monkeypatch.setenv("TUNERY_SECRET_KEY", Fernet.generate_key().decode())
    get_settings.cache_clear()
    monkeypatch.setattr(worker.pipeline.run, "run_job", pytest.fail)
    caplog.set_level(logging.DEBUG)

    train.run(job_id)

    job, lines = ended(job_id)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and "TUNERY_SECRET_KEY" in job.error
    assert any("TUNERY_SECRET_KEY" in line for line in lines)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (job.error, "\n".join(lines), logged):
        assert "enc:v1" not in text and ciphertext[7:40] not in text
    assert_scrubbed(job, lines, caplog)
