"""A job's artifacts as the API hands them out: one by one, or all in one tar.gz archive.

The worker stores them (`worker.publish`) under the keys `shared.storage_keys` names; this
module lists them and packs the archive. The archive is written as it is sent: each file is
read from storage a chunk at a time and compressed on the way, so an adapter of any size takes
a few chunks of memory, on local storage as on S3.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.storage import Storage, StorageError
from shared.storage_keys import artifact_name, is_export_artifact, job_artifact_prefix

ARCHIVE = "archive"
"""The name `GET …/artifacts/archive` answers to. A stored file of that name could not be
downloaded on its own, so it is no artifact: never listed, never archived (the worker writes
adapter and tokenizer files, none of them called that)."""

# Adapter weights barely compress at any level; the fastest one keeps the API's CPU for
# requests while tokenizer files still shrink several times.
_GZIP_LEVEL = 1
_GZIP_CONTAINER = 16 + zlib.MAX_WBITS


@dataclass(frozen=True)
class Artifact:
    name: str
    key: str
    size: int


def list_artifacts(storage: Storage, job_id: str, *, exports: bool = True) -> list[Artifact]:
    """The job's artifacts in storage, by name; with `exports` False, only the adapter and
    tokenizer the job wrote, not its exports (`exports/{kind}/...`, gigabytes each)."""
    found = []
    for obj in storage.list(job_artifact_prefix(job_id)):
        name = artifact_name(job_id, obj.key)
        if name is None or name == ARCHIVE or (not exports and is_export_artifact(name)):
            continue
        found.append(Artifact(name, obj.key, obj.size))
    return found


def archive_folder(job_id: str) -> str:
    """The folder the archive unpacks into, also the archive's file name without `.tar.gz`:
    what `PeftModel.from_pretrained` is then given."""
    return f"{job_id}-adapter"


def stream_archive(
    storage: Storage, artifacts: list[Artifact], *, folder: str, mtime: datetime | None = None
) -> Iterator[bytes]:
    """A gzip-compressed tar of `artifacts`, each as `{folder}/{name}`, yielded piece by piece
    as the files are read. Raises `StorageError` if a file's size is no longer the one listed
    (the tar header already promised it)."""
    return (piece for piece in _tar_gz(storage, artifacts, folder, mtime) if piece)


def _tar_gz(
    storage: Storage, artifacts: list[Artifact], folder: str, mtime: datetime | None
) -> Iterator[bytes]:
    gzip = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, _GZIP_CONTAINER)
    stamp = _timestamp(mtime)
    written = 0
    for artifact in artifacts:
        info = tarfile.TarInfo(f"{folder}/{artifact.name}")
        info.size, info.mode, info.mtime = artifact.size, 0o644, stamp
        header = info.tobuf(tarfile.PAX_FORMAT)
        yield gzip.compress(header)
        read = 0
        for chunk in storage.iter_bytes(artifact.key):
            read += len(chunk)
            if read > artifact.size:
                break
            yield gzip.compress(chunk)
        if read != artifact.size:
            raise StorageError(
                f"artifact {artifact.name} changed while it was archived: "
                f"{read} bytes read, {artifact.size} listed"
            )
        padding = -artifact.size % tarfile.BLOCKSIZE
        yield gzip.compress(bytes(padding))
        written += len(header) + artifact.size + padding
    # Two zero blocks end a tar, and the whole is padded to a record, as tarfile writes it.
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    yield gzip.compress(bytes(end)) + gzip.flush()


def _timestamp(moment: datetime | None) -> int:
    if moment is None:
        return 0
    # SQLite hands timestamps back without a zone; Tunery writes them all in UTC.
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
