"""The storage layout: where each kind of object lives, and which keys a job's artifacts are."""

from __future__ import annotations

from shared.storage_keys import (
    artifact_name,
    checkpoint_step_prefix,
    dataset_key,
    is_export_artifact,
    job_artifact_key,
    job_checkpoint_prefix,
    job_checkpoint_prefixes,
    job_export_prefix,
    parse_checkpoint_key,
    upload_staging_prefix,
)


def test_checkpoints_live_apart_from_artifacts() -> None:
    assert job_artifact_key("j1", "adapter.bin") == "jobs/j1/adapter.bin"
    assert checkpoint_step_prefix(job_checkpoint_prefix("j1"), 4) == "checkpoints/j1/step-4/"
    assert not job_checkpoint_prefix("j1").startswith("jobs/j1/")


def test_legacy_checkpoints_are_still_a_place_to_look() -> None:
    assert job_checkpoint_prefixes("j1") == ("checkpoints/j1/", "jobs/j1/checkpoints/")


def test_datasets_and_staged_uploads_have_their_own_folders() -> None:
    assert dataset_key("ds_1", "mine.jsonl") == "datasets/ds_1/mine.jsonl"
    assert upload_staging_prefix("ds_1") == "uploads/ds_1/"


def test_a_legacy_checkpoint_is_no_artifact() -> None:
    assert artifact_name("j1", "jobs/j1/adapter_config.json") == "adapter_config.json"
    assert artifact_name("j1", "jobs/j1/checkpoints/step-4/optimizer.pt") is None
    assert artifact_name("j1", "jobs/j10/adapter_config.json") is None
    assert artifact_name("j1", "checkpoints/j1/step-4/optimizer.pt") is None


def test_checkpoint_keys_parse_to_step_and_file() -> None:
    prefix = job_checkpoint_prefix("j1")
    assert parse_checkpoint_key(prefix, "checkpoints/j1/step-12/complete.json") == (
        12,
        "complete.json",
    )
    for key in (
        "checkpoints/j1/step-0/complete.json",
        "checkpoints/j1/step-x/complete.json",
        "checkpoints/j10/step-1/complete.json",
    ):
        assert parse_checkpoint_key(prefix, key) is None


def test_exports_are_artifacts_of_their_job_told_apart_from_the_adapter() -> None:
    key = job_export_prefix("j1", "gguf-q8_0") + "model-q8_0.gguf"
    assert key == "jobs/j1/exports/gguf-q8_0/model-q8_0.gguf"
    name = artifact_name("j1", key)
    assert name == "exports/gguf-q8_0/model-q8_0.gguf" and is_export_artifact(name)
    assert not is_export_artifact("adapter_model.safetensors")
    assert artifact_name("j2", key) is None
