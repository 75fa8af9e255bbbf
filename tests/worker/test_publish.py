"""The publish stage: the one place a job's outputs leave the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.schema import HuggingfaceConfig
from shared.storage import LocalStorage
from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped
from worker.publish import publish_outputs, push_to_hub

HF_TOKEN = "hf_secret_token"


def adapter_dir(tmp_path: Path) -> Path:
    output = tmp_path / "output"
    output.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        (output / name).write_bytes(b"{}")
    return output


def test_outputs_go_to_storage_under_the_job_prefix(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")
    lines: list[str] = []

    uploaded = publish_outputs("j", adapter_dir(tmp_path), HuggingfaceConfig(), storage,
                               should_stop=lambda: None, log=lines.append)

    assert uploaded == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert storage.exists("jobs/j/adapter_config.json")
    assert lines == ["uploaded 3 files to jobs/j/"]


def test_an_attempt_that_lost_its_lease_stops_uploading(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage")

    with pytest.raises(TrainingStopped) as stopped:
        publish_outputs("j", adapter_dir(tmp_path), HuggingfaceConfig(), storage,
                        should_stop=lambda: StopReason.LEASE_LOST)

    assert stopped.value.reason == StopReason.LEASE_LOST
    assert not list((tmp_path / "storage").rglob("*.json"))


def test_a_refused_hub_push_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    def refuse(self: Any, repo_id: str, **kwargs: Any) -> None:
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    storage = LocalStorage(tmp_path / "storage")
    hf = HuggingfaceConfig(hf_model_path="me/tiny-adapter", hf_token=HF_TOKEN)

    with pytest.raises(PipelineError):
        publish_outputs("j", adapter_dir(tmp_path), hf, storage, should_stop=lambda: None)

    assert not list((tmp_path / "storage").rglob("*.json"))


def test_failed_hub_push_is_a_pipeline_error_naming_the_repo_without_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hub is replaced at the edge: create_repo answers as the hub does to a read token.
    from huggingface_hub import HfApi

    def refuse(self: Any, repo_id: str, **kwargs: Any) -> None:
        raise PermissionError(f"403 Forbidden: token {kwargs['token']} cannot write {repo_id}")

    monkeypatch.setattr(HfApi, "create_repo", refuse)

    with pytest.raises(PipelineError) as info:
        push_to_hub(tmp_path, "me/tiny-adapter", token=HF_TOKEN)

    message = str(info.value)
    assert message.startswith("pushing the adapter to the hub repo 'me/tiny-adapter' failed")
    assert "403 Forbidden" in message and HF_TOKEN not in message
