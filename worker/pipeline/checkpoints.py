"""Checkpoints in storage, so that a later attempt of a job resumes instead of starting over.

Every `every_steps` optimizer steps the Trainer writes `checkpoint-N/` locally (adapter only,
never the base model, plus optimizer, scheduler, RNG and trainer state);
`callbacks.CheckpointCallback` copies it to the step's folder under `job_checkpoint_prefix`
and writes `complete.json` last. Readers ignore a checkpoint without that marker, so one cut
off mid-upload is never resumed from. Only the latest `keep` complete checkpoints stay in
storage. Checkpoints written under the legacy layout (`shared.storage_keys`) are read, pruned
and deleted alike.

What is read back is limited to `CHECKPOINT_FILES` under the job's own checkpoints prefix:
the optimizer, scheduler and RNG files are pickles, which transformers (5.x) loads with
`torch.load(weights_only=True)`, but they are still only ever taken from Tunery's own storage.
An earlier job's adapter (`resume_checkpoint_path`) is read as safetensors and JSON only.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.resume import parse_resume_path
from shared.schema import PretrainedModelConfig
from shared.storage import ObjectNotFound, Storage
from shared.storage_keys import (
    CHECKPOINT_MARKER,
    INITIAL_ADAPTER_FILE,
    checkpoint_step_prefix,
    is_full_model_file,
    is_full_model_weights,
    job_artifact_key,
    job_checkpoint_prefix,
    job_checkpoint_prefixes,
    parse_checkpoint_key,
)
from worker.pipeline.errors import PipelineError
from worker.pipeline.export import ADAPTER_FILES
from worker.pipeline.report import LogFn, no_log

MARKER = CHECKPOINT_MARKER
# The best adapter so far (`callbacks.BestAdapterCallback`), with its eval_loss and step.
BEST_ADAPTER_FILE = "best_adapter.safetensors"
# What transformers' Trainer needs for resume_from_checkpoint with a peft model (a full
# fine-tune's model files instead: `storage_keys.is_full_model_file`). Tokenizer
# files are not needed, and training_args.bin is a pickle of the whole TrainingArguments that
# resume never reads: neither is uploaded.
CHECKPOINT_FILES = frozenset(
    {
        *ADAPTER_FILES,
        "optimizer.pt",
        "scheduler.pt",
        "scaler.pt",
        "rng_state.pth",
        "trainer_state.json",
        # The best adapter so far, for the best-eval_loss restore at the end of training.
        BEST_ADAPTER_FILE,
        # PiSSA / OLoRA: the adapter's start, which the base residual is rebuilt from.
        INITIAL_ADAPTER_FILE,
    }
)
# One RNG file per process in multi-GPU runs.
_PER_PROCESS_RNG = re.compile(r"rng_state_[0-9]{1,4}\.pth")


def is_checkpoint_file(name: str) -> bool:
    return (name in CHECKPOINT_FILES or bool(_PER_PROCESS_RNG.fullmatch(name))
            or is_full_model_file(name))


@dataclass(frozen=True)
class StoredCheckpoint:
    """A complete checkpoint in storage: its step and the files its marker lists."""

    job_id: str
    step: int
    files: dict[str, int]
    """File name -> size in bytes."""
    under: str = ""
    """The checkpoints prefix it lives under; empty for `job_checkpoint_prefix`, where every
    new checkpoint goes (a legacy one names its own)."""

    @property
    def prefix(self) -> str:
        return checkpoint_step_prefix(self.under or job_checkpoint_prefix(self.job_id), self.step)


def list_checkpoints(storage: Storage, job_id: str) -> list[StoredCheckpoint]:
    """The job's complete checkpoints, oldest first; incomplete or unreadable ones are skipped.

    A step stored under both layouts counts once, from the current one."""
    found: dict[int, StoredCheckpoint] = {}
    for prefix in job_checkpoint_prefixes(job_id):
        for obj in storage.list(prefix):
            parsed = parse_checkpoint_key(prefix, obj.key)
            if parsed is None or parsed[1] != MARKER or parsed[0] in found:
                continue
            checkpoint = _read_marker(storage, job_id, prefix, parsed[0], obj.key)
            if checkpoint is not None:
                found[checkpoint.step] = checkpoint
    return sorted(found.values(), key=lambda c: c.step)


def _read_marker(
    storage: Storage, job_id: str, prefix: str, step: int, key: str
) -> StoredCheckpoint | None:
    try:
        marker = json.loads(b"".join(storage.iter_bytes(key)))
        files = {str(name): int(size) for name, size in marker["files"].items()}
    except (ObjectNotFound, ValueError, KeyError, TypeError, AttributeError):
        return None  # deleted while we listed, or not a marker we wrote: not resumable
    if marker.get("step") != step or not files or not all(map(is_checkpoint_file, files)):
        return None
    if any(name in ADAPTER_FILES for name in files) and any(map(is_full_model_file, files)):
        return None  # an adapter or a whole model, never both: not a checkpoint we wrote
    under = "" if prefix == job_checkpoint_prefix(job_id) else prefix
    return StoredCheckpoint(job_id, step, files, under)


def find_latest_checkpoint(storage: Storage, job_id: str) -> StoredCheckpoint | None:
    """The job's latest complete checkpoint, or None."""
    checkpoints = list_checkpoints(storage, job_id)
    return checkpoints[-1] if checkpoints else None


def download_checkpoint(
    storage: Storage,
    checkpoint: StoredCheckpoint,
    dest: Path,
    names: Iterable[str] | None = None,
) -> Path:
    """Download the checkpoint's files (or only `names`) into `dest`, emptied first.

    Only names `is_checkpoint_file` accepts are read, and only from the checkpoint's own
    prefix, so a marker can never make the worker fetch (and later unpickle) another object.
    """
    wanted = list(checkpoint.files) if names is None else list(names)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in wanted:
        if not is_checkpoint_file(name) or name not in checkpoint.files:
            raise PipelineError(f"checkpoint step {checkpoint.step} has no file {name!r}")
        path = dest / name
        storage.download_file(checkpoint.prefix + name, path)
        if path.stat().st_size != checkpoint.files[name]:
            raise PipelineError(
                f"checkpoint step {checkpoint.step}: {name} has {path.stat().st_size} bytes, "
                f"its marker says {checkpoint.files[name]}"
            )
    return dest


def upload_checkpoint(
    storage: Storage, job_id: str, step: int, local_dir: Path
) -> StoredCheckpoint:
    """Upload a Trainer checkpoint directory, then its marker; returns what was stored."""
    files = {
        p.name: p.stat().st_size
        for p in sorted(local_dir.iterdir())
        if p.is_file() and is_checkpoint_file(p.name)
    }
    missing = [name for name in ADAPTER_FILES if name not in files]
    if missing and not any(map(is_full_model_weights, files)):
        raise RuntimeError(f"the Trainer wrote no {missing} (nor a full model) to {local_dir}")
    checkpoint = StoredCheckpoint(job_id, step, files)
    for name in files:
        storage.put_file(checkpoint.prefix + name, local_dir / name)
    # Last: from here on readers may use the checkpoint.
    marker = {"step": step, "files": files}
    storage.put_bytes(checkpoint.prefix + MARKER, json.dumps(marker, indent=1).encode())
    return checkpoint


def prune_checkpoints(storage: Storage, job_id: str, keep: int) -> list[int]:
    """Delete all but the latest `keep` complete checkpoints, and any incomplete one older
    than the latest complete one (a crashed upload). Returns the deleted steps.

    Nothing is written under the legacy layout any more, so there any checkpoint not kept
    goes, whatever its step."""
    complete = list_checkpoints(storage, job_id)
    if not complete:
        return []
    kept = {c.prefix for c in complete[-keep:]}
    latest = complete[-1].step
    current = job_checkpoint_prefix(job_id)
    doomed: dict[str, int] = {}
    for prefix in job_checkpoint_prefixes(job_id):
        for obj in storage.list(prefix):
            parsed = parse_checkpoint_key(prefix, obj.key)
            if parsed is None:
                continue
            step_prefix = checkpoint_step_prefix(prefix, parsed[0])
            if step_prefix not in kept and (parsed[0] < latest or prefix != current):
                doomed[step_prefix] = parsed[0]
    for step_prefix in doomed:
        storage.delete_prefix(step_prefix)
    return sorted(set(doomed.values()))


@dataclass(frozen=True)
class CheckpointStore:
    """Where one job's checkpoints go and how many stay: what `run_job` needs for resume."""

    storage: Storage
    job_id: str
    every_steps: int = 50
    keep: int = 2
    attempt: int = 1
    """The job's attempt that reads and writes these checkpoints, named where it resumes."""

    def latest(self) -> StoredCheckpoint | None:
        return find_latest_checkpoint(self.storage, self.job_id)

    def upload(self, step: int, local_dir: Path) -> StoredCheckpoint:
        checkpoint = upload_checkpoint(self.storage, self.job_id, step, local_dir)
        prune_checkpoints(self.storage, self.job_id, self.keep)
        return checkpoint

    def keep_adapters_only(self) -> None:
        """What a completed job keeps of its checkpoints: each one's adapter and marker, which
        the API lists as the job's checkpoints. The optimizer, scheduler and RNG state only a
        resume reads are deleted: nothing resumes a completed job. A full fine-tune's
        checkpoints keep their marker only: their copies of the whole model go too."""
        for prefix in job_checkpoint_prefixes(self.job_id):
            for obj in self.storage.list(prefix):
                parsed = parse_checkpoint_key(prefix, obj.key)
                if parsed is None or parsed[1] not in (*ADAPTER_FILES, INITIAL_ADAPTER_FILE,
                                                       MARKER):
                    self.storage.delete(obj.key)

    def delete_all(self) -> None:
        """Drop the job's checkpoints, under either layout; the final adapter supersedes them."""
        for prefix in job_checkpoint_prefixes(self.job_id):
            self.storage.delete_prefix(prefix)


def download_resume_checkpoint(
    store: CheckpointStore, dest: Path, *, log: LogFn = no_log
) -> Path | None:
    """The job's latest complete checkpoint as a local directory for
    `Trainer.train(resume_from_checkpoint=...)`, or None when there is none."""
    checkpoint = store.latest()
    if checkpoint is None:
        return None
    download_checkpoint(store.storage, checkpoint, dest)
    log(f"resumed from step {checkpoint.step} (attempt {store.attempt})")
    return dest


def download_initial_adapter(
    storage: Storage, resume_path: str, dest: Path, *, log: LogFn = no_log
) -> Path:
    """Download the adapter `resume_checkpoint_path` names (safetensors and JSON only), with
    the initial adapter of a PiSSA/OLoRA checkpoint (`lora_init`): that adapter is relative to
    the base residual the initial one rebuilds. A job's final adapter needs none: the export
    converted it to one for the original base."""
    try:
        source = parse_resume_path(resume_path)
    except ValueError as exc:
        raise PipelineError(f"resume_checkpoint_path: {exc}") from None
    checkpoint: StoredCheckpoint | None = None
    if source.step is not None:
        checkpoint = next(
            (c for c in list_checkpoints(storage, source.job_id) if c.step == source.step), None
        )
        if checkpoint is None:
            raise PipelineError(
                f"resume_checkpoint_path: job {source.job_id} has no complete checkpoint at "
                f"step {source.step}"
            )
    elif not storage.exists(job_artifact_key(source.job_id, ADAPTER_FILES[0])):
        checkpoint = find_latest_checkpoint(storage, source.job_id) if source.latest else None
        if checkpoint is None:
            raise PipelineError(
                f"resume_checkpoint_path: job {source.job_id} has no adapter in storage"
            )
    if checkpoint is not None:
        names = [*ADAPTER_FILES, *([INITIAL_ADAPTER_FILE]
                                   if INITIAL_ADAPTER_FILE in checkpoint.files else [])]
        download_checkpoint(storage, checkpoint, dest, names)
        log(f"continuing from the adapter of job {source.job_id} at step {checkpoint.step}")
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    for name in ADAPTER_FILES:
        storage.download_file(job_artifact_key(source.job_id, name), dest / name)
    log(f"continuing from the final adapter of job {source.job_id}")
    return dest


def load_initial_adapter(model: Any, adapter_dir: Path, config: PretrainedModelConfig) -> None:
    """Overwrite the fresh LoRA weights of `model` (a PeftModel) with a saved adapter's.

    The optimizer is not restored: the job trains the earlier weights with its own config.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    pairs = (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("use_dora", "use_dora"),
             ("use_rslora", "use_rslora"))
    for ours, theirs in pairs:
        # A missing flag is peft's default, False.
        default = False if ours.startswith("use_") else None
        if saved.get(theirs, default) != getattr(config, ours):
            raise PipelineError(
                f"resume_checkpoint_path: the earlier adapter has {ours}={saved.get(theirs)}, "
                f"this job {ours}={getattr(config, ours)}; they must be equal"
            )
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    try:
        # torch's load_state_dict result: missing_keys / unexpected_keys
        result: Any = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # tensor shapes differ
        raise PipelineError(
            f"resume_checkpoint_path: the earlier adapter does not fit this model: {exc}"
        ) from None
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise PipelineError(
            "resume_checkpoint_path: the earlier adapter covers other layers than this job's "
            f"LoRA ({len(missing)} missing, {len(result.unexpected_keys)} unexpected tensors)"
        )


@dataclass(frozen=True)
class StartingPoint:
    """Where training starts, downloaded before the LoRA adapter is built: the job's own
    latest checkpoint (the Trainer resumes from it), or `resume_checkpoint_path`'s adapter
    (its weights start the fresh LoRA), or neither."""

    checkpoint: Path | None = None
    earlier_adapter: Path | None = None

    @property
    def initial_adapter(self) -> Path | None:
        """The PiSSA/OLoRA initial adapter that came with either, for `add_lora`."""
        for directory in (self.checkpoint, self.earlier_adapter):
            if directory is not None and (directory / INITIAL_ADAPTER_FILE).is_file():
                return directory / INITIAL_ADAPTER_FILE
        return None


def download_starting_point(
    config: PretrainedModelConfig,
    store: CheckpointStore | None,
    work_dir: Path,
    *,
    log: LogFn = no_log,
) -> StartingPoint:
    """Decide where training starts and download it.

    The job's own latest checkpoint wins (an earlier attempt got that far; it already holds
    the adapter weights). Otherwise `resume_checkpoint_path` names an earlier job's adapter.
    Otherwise training starts from scratch.
    """
    if store is not None:
        resume_from = download_resume_checkpoint(store, work_dir / "resume", log=log)
        if resume_from is not None:
            return StartingPoint(checkpoint=resume_from)
    if config.resume_checkpoint_path:
        if store is None:
            raise PipelineError("resume_checkpoint_path needs the worker's storage; none given")
        adapter_dir = download_initial_adapter(
            store.storage, config.resume_checkpoint_path, work_dir / "initial-adapter", log=log
        )
        return StartingPoint(earlier_adapter=adapter_dir)
    return StartingPoint()


def restore_starting_point(
    model: Any, config: PretrainedModelConfig, start: StartingPoint
) -> Path | None:
    """Put the earlier adapter's weights into the fresh LoRA of `model`, if the job starts
    from one; returns the checkpoint directory the Trainer resumes from, or None."""
    if start.earlier_adapter is not None:
        load_initial_adapter(model, start.earlier_adapter, config)
    return start.checkpoint
