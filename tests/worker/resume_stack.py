"""What the resume tests share: a local storage and settings for the tiny model, the job each
run leaves, and a checkpoint store every two steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.settings import Settings
from shared.storage import LocalStorage
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.checkpoints import CheckpointStore
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import TrainResult


@dataclass
class Job:
    result: TrainResult
    reporter: RecordingReporter


@dataclass
class Stack:
    storage: LocalStorage
    settings: Settings
    work: Path


def make_stack(tmp_path_factory: pytest.TempPathFactory, name: str,
               tiny_model_dir: Path) -> Stack:
    tmp = tmp_path_factory.mktemp(name)
    settings = Settings(
        data_dir=tmp / "data", allowed_local_dirs=[DATASET_PATH.parent, tiny_model_dir.parent]
    )
    return Stack(LocalStorage(tmp / "storage"), settings, tmp)


def store(stack: Stack, job_id: str, attempt: int = 1) -> CheckpointStore:
    return CheckpointStore(stack.storage, job_id, every_steps=2, keep=2, attempt=attempt)
