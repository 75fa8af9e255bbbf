"""Checkpoint uploads off the training thread: training goes on while a checkpoint travels to
storage, through an outage too, as long as storage's retry deadline allows.

One upload at a time: the next checkpoint waits for the previous one, so checkpoints reach
storage in step order and pruning (`CheckpointStore.upload`) never races another upload.
The end of training waits for the last one (`wait`), so nothing is published, and no job
handed back, before its last checkpoint is in storage or known lost.

The Trainer may delete its local `checkpoint-N/` (save_total_limit) or write the next one while
an upload runs, so each upload reads a snapshot: hard links to the files in a staging
directory beside it, which cost no copy and outlive the Trainer's deletes.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from worker.pipeline.checkpoints import CheckpointStore, StoredCheckpoint, is_checkpoint_file

UploadedFn = Callable[[StoredCheckpoint], None]


class BackgroundUploads:
    """Uploads `CheckpointStore` checkpoints one at a time in a thread; `uploaded` is called
    (in that thread) with each checkpoint once it is complete in storage."""

    def __init__(self, store: CheckpointStore, uploaded: UploadedFn) -> None:
        self.store = store
        self.uploaded = uploaded
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def error(self) -> BaseException | None:
        """Why the last upload failed (storage unreachable past its deadline), or None."""
        return self._error

    def start(self, step: int, local_dir: Path) -> None:
        """Upload `local_dir` as the checkpoint of `step`, after the upload before it; raises
        that one's error if it failed (training must not go on without checkpoints)."""
        self.wait()
        staged = _stage(local_dir)
        self._thread = threading.Thread(
            target=self._upload, args=(step, staged), name=f"checkpoint-upload-{step}",
            daemon=True,
        )
        self._thread.start()

    def wait(self) -> None:
        """Until the upload under way has ended; raises its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def _upload(self, step: int, staged: Path) -> None:
        try:
            self.uploaded(self.store.upload(step, staged))
        except BaseException as exc:  # told to the training thread at its next step
            self._error = exc
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def _stage(local_dir: Path) -> Path:
    staged = local_dir.with_name(f".uploading-{local_dir.name}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for path in local_dir.iterdir():
        if path.is_file() and is_checkpoint_file(path.name):
            try:
                os.link(path, staged / path.name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(path, staged / path.name)
    return staged
