"""The export stage: the adapter and the tokenizer, nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from worker.pipeline.errors import PipelineError
from worker.pipeline.report import LogFn, no_log

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def export_adapter(
    model: Any, tokenizer: Any, output_dir: Path, *, log: LogFn = no_log
) -> Path:
    """Write `adapter_model.safetensors`, `adapter_config.json` and the tokenizer files.

    `output_dir` is emptied first, so a retried attempt never uploads a stale file.
    """
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    # peft's generated model card carries nothing the client needs.
    (output_dir / "README.md").unlink(missing_ok=True)
    missing = [name for name in ADAPTER_FILES if not (output_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"peft did not write {missing} to {output_dir}")
    tokenizer.save_pretrained(output_dir)
    size = sum(p.stat().st_size for p in output_dir.iterdir() if p.is_file())
    log(f"adapter and tokenizer saved: {size / 1e6:.1f} MB")
    return output_dir


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
