"""The "uploading" stage: where a job's outputs leave the worker, and the only place.

The exported adapter goes to the hub when the request names a repo (`hf_model_path`), then to
storage under the job's artifact prefix, where the API serves it from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shared.schema import HuggingfaceConfig
from shared.storage import Storage
from shared.storage_keys import job_artifact_key, job_artifact_prefix
from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped
from worker.pipeline.report import LogFn, no_log


def publish_outputs(
    job_id: str,
    output_dir: Path,
    hf: HuggingfaceConfig,
    storage: Storage,
    *,
    should_stop: Callable[[], StopReason | None],
    log: LogFn = no_log,
) -> list[str]:
    """Push `output_dir` to the hub repo the request names, if any, then upload it to storage;
    returns the names stored. Raises `PipelineError` if the hub refuses, before anything is
    stored, and `TrainingStopped` if the attempt is told to stop between two files."""
    if hf.hf_model_path:
        assert hf.hf_token is not None  # the schema requires it with hf_model_path
        push_to_hub(output_dir, hf.hf_model_path, token=hf.hf_token, log=log)
    uploaded = upload_outputs(storage, job_id, output_dir, should_stop=should_stop)
    log(f"uploaded {len(uploaded)} files to {job_artifact_prefix(job_id)}")
    return uploaded


def upload_outputs(
    storage: Storage,
    job_id: str,
    output_dir: Path,
    *,
    should_stop: Callable[[], StopReason | None] | None = None,
) -> list[str]:
    """Upload the adapter under the job's prefix; stops between files if the attempt lost its
    lease, so a stale attempt stops writing where a newer one writes the job's one adapter."""
    names = []
    for path in sorted(p for p in output_dir.rglob("*") if p.is_file()):
        reason = should_stop() if should_stop is not None else None
        if reason is not None:
            raise TrainingStopped(reason)
        name = path.relative_to(output_dir).as_posix()
        storage.put_file(job_artifact_key(job_id, name), path)
        names.append(name)
    return names


def push_to_hub(
    folder: Path, repo_id: str, *, token: str, log: LogFn = no_log
) -> str:
    """Upload `folder` (the exported adapter and tokenizer) to the hub model repo `repo_id`.

    The repo is created private if it does not exist; an existing repo keeps its visibility.
    Returns the commit URL. Any hub failure (bad token, no write access, network) is a
    `PipelineError` that names the repo and never shows the token.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, token=token, private=True, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            token=token,
            repo_type="model",
            commit_message="Upload LoRA adapter trained with Tunery",
        )
    except Exception as exc:  # HTTP, auth, network: all mean "the adapter is not on the hub"
        message = f"{type(exc).__name__}: {exc}".replace(token, "***")
        raise PipelineError(
            f"pushing the adapter to the hub repo {repo_id!r} failed: {message}"
        ) from None
    url = str(getattr(commit, "commit_url", "") or f"https://huggingface.co/{repo_id}")
    log(f"adapter pushed to the hub: {url}")
    return url
