"""Where a claimed job runs and where its hub downloads go: an empty working directory of its
own, and, for a job with a token, a hub cache only its tenant's jobs use."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from shared import jobs
from shared.db import session_scope
from shared.keys import create_api_key
from shared.migrate import upgrade_database
from shared.models import Job, JobStatus
from shared.settings import get_settings
from worker.assets.build_dataset import DATASET_PATH
from worker.tasks import run_claimed_job

HUB_DATASET = "tunery-tests/alpaca-mini"
HF_TOKEN = "hf_job_dirs_token"


def _run_hub_job(
    tunery_env: Path, tiny_model_dir: Path, make_request: Any, monkeypatch: pytest.MonkeyPatch,
    hf: dict[str, Any],
) -> tuple[str, str, dict[str, Any]]:
    """Claim and run one job on the hub dataset; returns (job id, tenant id, what the hub
    dataset loader saw).

    The hub is the edge this machine cannot reach: datasets.load_dataset is replaced by a
    stand-in that records the working directory and the arguments it was called with and
    returns a real in-memory Dataset.
    """
    import datasets

    monkeypatch.setenv("TUNERY_ALLOWED_LOCAL_DIRS", f'["{tiny_model_dir.parent}"]')
    rows = [json.loads(line) for line in DATASET_PATH.read_text().splitlines()]
    seen: dict[str, Any] = {}

    def hub_edge(path: str, name: str | None = None, **kwargs: Any) -> Any:
        seen.update(path=path, cwd=os.getcwd(), cwd_entries=os.listdir("."),
                    cwd_mode=stat.S_IMODE(os.stat(".").st_mode), **kwargs)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", hub_edge)
    request = make_request(HUB_DATASET, hf=hf)
    get_settings.cache_clear()
    settings = get_settings()
    upgrade_database(settings.database.url)
    with session_scope() as session:
        tenant = create_api_key(session, "job-dirs").tenant_id
        job_id = jobs.create_job(session, tenant, request, max_attempts=1, device_class="train").id
        claim = jobs.claim_job(session, job_id, "w", settings.leases.lease_seconds)
    assert claim is not None and claim.tenant_id == tenant

    run_claimed_job(claim, request)

    with session_scope() as session:
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.COMPLETED.value, job.error
    return job_id, tenant, seen


def test_a_job_runs_in_an_empty_private_directory_and_gives_the_old_one_back(
    tunery_env: Path, tiny_model_dir: Path, make_request: Any, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Relative names (a packaged builder's data files, a hub id that is also a directory)
    # resolve against the current directory: never the checkout or the data dir.
    before = tmp_path / "elsewhere"
    before.mkdir()
    (before / "secret.key").write_text("not for jobs")
    monkeypatch.chdir(before)

    job_id, _, seen = _run_hub_job(tunery_env, tiny_model_dir, make_request, monkeypatch, hf={})

    work_dir = get_settings().training.work_dir
    assert work_dir is not None
    assert seen["cwd"] == str(work_dir / f"{job_id}-1" / "cwd")
    assert seen["cwd_entries"] == []
    assert seen["cwd_mode"] == 0o700
    assert os.getcwd() == str(before)


def test_a_job_with_a_token_uses_its_tenants_hub_cache_and_a_public_one_the_shared_cache(
    tunery_env: Path, tiny_model_dir: Path, make_request: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, tenant, private = _run_hub_job(tunery_env, tiny_model_dir, make_request, monkeypatch,
                                      hf={"hf_token": HF_TOKEN})
    _, _, public = _run_hub_job(tunery_env, tiny_model_dir, make_request, monkeypatch, hf={})

    tenant_cache = get_settings().data_dir / "hf-cache" / "tenants" / tenant
    assert private["token"] == HF_TOKEN
    assert private["cache_dir"] == str(tenant_cache)
    assert stat.S_IMODE(tenant_cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(tenant_cache.parent.stat().st_mode) == 0o700
    # No token: public content, the shared cache (datasets' default).
    assert public["token"] is None
    assert "cache_dir" not in public
