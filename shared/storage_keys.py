"""Every key Tunery reads or writes in storage: the layout, in one place.

    jobs/{job_id}/{name}                   a job's artifacts: the adapter it exported
    jobs/{job_id}/exports/{kind}/{name}    an export of it (merged model, GGUF + Modelfile),
                                           also an artifact, never in the adapter's archive
    checkpoints/{job_id}/step-{N}/{name}   a job's resumable checkpoints
    datasets/{dataset_id}/{file_name}      an uploaded dataset that passed its checks
    tokenized/{dataset_id}/{fingerprint}/  its tokenized examples, one folder per tokenizer,
                                           template and cutoff_len (`worker.pipeline.token_cache`)
    uploads/{dataset_id}/{name}            a presigned upload waiting for its checks

Checkpoints were once written inside the job's artifacts, at
``jobs/{job_id}/checkpoints/step-N/``. Jobs written then still exist, so readers and deleters
look under both checkpoint prefixes (`job_checkpoint_prefixes`), and the artifacts of a job
never include that legacy folder (`artifact_name`). Only the new layout is ever written.

Pure functions, no I/O: `shared.storage` moves the bytes, this module names them. The
user-facing reference ``jobs/{job_id}/checkpoints/step-N`` of `resume_checkpoint_path`
(`shared.resume`) is public API, not a storage key, and does not change with this layout.
"""

from __future__ import annotations

import re

_STEP_DIR = re.compile(r"step-([1-9][0-9]{0,9})")

# Written last into a checkpoint's step folder: a folder without it was cut off mid-upload
# and is never resumed from.
CHECKPOINT_MARKER = "complete.json"
# What a LoRA adapter is on disk, as peft writes it: in a job's artifacts and in each of its
# checkpoints.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# A PiSSA / OLoRA job's checkpoints also hold the adapter it started from: their adapter is
# relative to the base minus that initial adapter (`worker.pipeline.lora_init`).
INITIAL_ADAPTER_FILE = "initial_adapter.safetensors"
# What a full fine-tune is on disk, as transformers writes it (`save_pretrained`): in a job's
# artifacts and in each of its checkpoints. The weights are one file or numbered shards with
# their index.
FULL_MODEL_CONFIG = "config.json"
FULL_MODEL_FILES = (FULL_MODEL_CONFIG, "generation_config.json", "model.safetensors",
                    "model.safetensors.index.json")
_FULL_MODEL_SHARD = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors")


def is_full_model_file(name: str) -> bool:
    """Whether `name` is one of the files of a full fine-tune's model."""
    return name in FULL_MODEL_FILES or bool(_FULL_MODEL_SHARD.fullmatch(name))


def is_full_model_weights(name: str) -> bool:
    """Whether `name` holds (or indexes) a full model's weights."""
    return is_full_model_file(name) and name.endswith((".safetensors", ".index.json"))


def job_artifact_prefix(job_id: str) -> str:
    """The folder of a job's artifacts; also holds legacy checkpoints (see `artifact_name`)."""
    return f"jobs/{job_id}/"


def job_artifact_key(job_id: str, name: str) -> str:
    return job_artifact_prefix(job_id) + name


def artifact_name(job_id: str, key: str) -> str | None:
    """The artifact name of `key`, or None when it is no artifact of the job: outside its
    folder, or a checkpoint written there under the legacy layout."""
    prefix = job_artifact_prefix(job_id)
    if not key.startswith(prefix) or key.startswith(_legacy_checkpoint_prefix(job_id)):
        return None
    return key.removeprefix(prefix)


EXPORTS_FOLDER = "exports/"


def job_export_prefix(job_id: str, kind: str) -> str:
    """The folder of one export of a job (`kind`: `shared.exports.ExportKind`), inside its
    artifacts so that the artifacts routes list and serve it."""
    return f"{job_artifact_prefix(job_id)}{EXPORTS_FOLDER}{kind}/"


def is_export_artifact(name: str) -> bool:
    """Whether the artifact `name` (from `artifact_name`) belongs to an export, not to the
    adapter the job itself wrote."""
    return name.startswith(EXPORTS_FOLDER)


def job_checkpoint_prefix(job_id: str) -> str:
    """Where a job's checkpoints are written, apart from its artifacts."""
    return f"checkpoints/{job_id}/"


def _legacy_checkpoint_prefix(job_id: str) -> str:
    return f"{job_artifact_prefix(job_id)}checkpoints/"


def job_checkpoint_prefixes(job_id: str) -> tuple[str, str]:
    """Every prefix a job's checkpoints may live under, the current layout first."""
    return job_checkpoint_prefix(job_id), _legacy_checkpoint_prefix(job_id)


def checkpoint_step_prefix(checkpoints_prefix: str, step: int) -> str:
    """The folder of the checkpoint at `step` under one of `job_checkpoint_prefixes`."""
    return f"{checkpoints_prefix}step-{step}/"


def parse_checkpoint_key(checkpoints_prefix: str, key: str) -> tuple[int, str] | None:
    """(step, file name) of a key under `checkpoints_prefix`, or None when it is not in a
    ``step-N/`` folder there."""
    if not key.startswith(checkpoints_prefix):
        return None
    step_dir, _, name = key.removeprefix(checkpoints_prefix).partition("/")
    match = _STEP_DIR.fullmatch(step_dir)
    return None if match is None else (int(match[1]), name)


def job_prefixes(job_id: str) -> tuple[str, str]:
    """Every folder that holds a job's objects: its artifacts (exports and legacy checkpoints
    inside) and its checkpoints. Deleting a job deletes exactly these."""
    return job_artifact_prefix(job_id), job_checkpoint_prefix(job_id)


def dataset_prefix(dataset_id: str) -> str:
    """The folder of an uploaded dataset's checked file; nothing unchecked is ever put here."""
    return f"datasets/{dataset_id}/"


def dataset_key(dataset_id: str, file_name: str) -> str:
    return dataset_prefix(dataset_id) + file_name


def upload_staging_prefix(dataset_id: str) -> str:
    """Where a presigned upload lands before the API has checked it."""
    return f"uploads/{dataset_id}/"


def tokenized_prefix(dataset_id: str) -> str:
    """Where an uploaded dataset's tokenized examples are kept; removed with the dataset."""
    return f"tokenized/{dataset_id}/"
