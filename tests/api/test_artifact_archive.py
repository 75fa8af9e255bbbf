"""A completed job's adapter in one download: `GET /v1/finetune/llm/{id}/artifacts/archive`, a
tar.gz of the files `…/artifacts` lists, streamed from local storage as it is read."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

from fastapi.testclient import TestClient

from shared import jobs
from shared.artifacts import archive_folder, list_artifacts, stream_archive
from shared.db import session_scope
from shared.models import Job, JobStatus
from shared.settings import get_settings
from shared.storage import LocalStorage, Storage, storage_from_settings
from tests.api.conftest import new_key
from tests.api.test_finetune_routes import submit

WEIGHTS = os.urandom(3 * 2**20 + 5)  # more than one storage chunk, not a multiple of 512
FILES = {
    "adapter_config.json": b'{"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}',
    "adapter_model.safetensors": WEIGHTS,
    "tokenizer.json": b'{"model": {"vocab": {}}}' * 1000,
}


def completed_job(client: TestClient, files: dict[str, bytes] = FILES) -> str:
    job_id: str = submit(client)["job_id"]
    storage = storage_from_settings(get_settings())
    for name, data in files.items():
        storage.put_bytes(f"jobs/{job_id}/{name}", data)
    with session_scope() as session:
        claim = jobs.claim_job(session, job_id, "w", 60)
        assert claim is not None
        assert jobs.transition(session, job_id, JobStatus.COMPLETED, attempt=claim.attempt)
    return job_id


def unpacked(data: bytes) -> dict[str, tuple[bytes, int]]:
    """Name -> (content, mtime) of every member of a tar.gz."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        found = {}
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            assert extracted is not None
            found[member.name] = (extracted.read(), member.mtime)
        return found


def test_completed_job_downloads_its_artifacts_as_one_tar_gz(client: TestClient) -> None:
    job_id = completed_job(client)
    storage = storage_from_settings(get_settings())
    # Checkpoints of either layout are no artifacts: listed by neither route.
    storage.put_bytes(f"jobs/{job_id}/checkpoints/step-4/optimizer.pt", b"legacy")
    storage.put_bytes(f"checkpoints/{job_id}/step-6/optimizer.pt", b"current")

    listing = client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()
    assert listing["archive_url"] == f"/v1/finetune/llm/{job_id}/artifacts/archive"
    response = client.get(listing["archive_url"])

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["content-disposition"] == (
        f'attachment; filename="{job_id}-adapter.tar.gz"')
    members = unpacked(response.content)
    assert {name: content for name, (content, _) in members.items()} == {
        f"{job_id}-adapter/{name}": data for name, data in FILES.items()
    }
    with session_scope() as session:
        finished = session.get_one(Job, job_id).finished_at
    assert finished is not None
    assert {mtime for _, mtime in members.values()} == {
        int(finished.replace(tzinfo=finished.tzinfo or UTC).timestamp())}
    assert sorted(a["name"] for a in listing["artifacts"]) == sorted(FILES)


def test_archive_of_a_job_not_completed_or_of_another_tenant_is_404(
    client: TestClient, app_client: TestClient
) -> None:
    queued = submit(client)["job_id"]
    done = completed_job(client)

    not_done = client.get(f"/v1/finetune/llm/{queued}/artifacts/archive")
    assert not_done.status_code == 404
    assert "QUEUED" in not_done.json()["error"]["message"]
    assert client.get(f"/v1/finetune/llm/{queued}/artifacts").json()["archive_url"] is None

    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    as_other = app_client.get(f"/v1/finetune/llm/{done}/artifacts/archive", headers=other)
    missing = app_client.get(f"/v1/finetune/llm/{queued}x/artifacts/archive", headers=other)
    assert as_other.status_code == missing.status_code == 404
    assert as_other.json()["error"]["code"] == "not_found"
    # Exactly the answer about a job that does not exist.
    assert as_other.text.replace(done, "<id>") == missing.text.replace(f"{queued}x", "<id>")


def test_completed_job_without_stored_artifacts_has_no_archive(client: TestClient) -> None:
    job_id = completed_job(client, files={})

    assert client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()["archive_url"] is None
    response = client.get(f"/v1/finetune/llm/{job_id}/artifacts/archive")
    assert response.status_code == 404
    assert "no artifacts" in response.json()["error"]["message"]


def test_a_stored_file_named_archive_is_no_artifact_and_the_route_still_archives(
    client: TestClient,
) -> None:
    job_id = completed_job(client, files={**FILES, "archive": b"not the archive"})

    listing = client.get(f"/v1/finetune/llm/{job_id}/artifacts").json()
    response = client.get(f"/v1/finetune/llm/{job_id}/artifacts/archive")

    assert "archive" not in [a["name"] for a in listing["artifacts"]]
    assert sorted(unpacked(response.content)) == sorted(
        f"{job_id}-adapter/{name}" for name in FILES)
    # A folder of that name is not reserved: its files are artifacts like any other.
    in_folder = completed_job(client, files={"archive/x.txt": b"x"})
    assert client.get(f"/v1/finetune/llm/{in_folder}/artifacts/archive/x.txt").content == b"x"
    assert list(unpacked(client.get(f"/v1/finetune/llm/{in_folder}/artifacts/archive").content)
                ) == [f"{in_folder}-adapter/archive/x.txt"]


class OpenedKeys(LocalStorage):
    """Local storage that notes in `events` each object a read opens."""

    def __init__(self, root: Path, events: list[str | int]) -> None:
        super().__init__(root)
        self.events = events

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        self.events.append(key.rsplit("/", 1)[-1])
        return super().iter_bytes(key, chunk_size)


def test_the_archive_is_sent_as_its_files_are_read_never_whole_in_memory(
    tmp_path: Path,
) -> None:
    events: list[str | int] = []  # the names of the files opened, the sizes of pieces sent
    storage: Storage = OpenedKeys(tmp_path, events)
    for name, data in FILES.items():
        storage.put_bytes(f"jobs/job-1/{name}", data)

    pieces = []
    for piece in stream_archive(storage, list_artifacts(storage, "job-1"),
                                folder=archive_folder("job-1")):
        events.append(len(piece))
        pieces.append(piece)

    weights = events.index("adapter_model.safetensors")
    sent_while_reading_weights = events[weights + 1 : events.index("tokenizer.json")]
    # Random weights do not compress: their 3 MiB leave in pieces of about one storage chunk
    # as they are read, most of them before the next file is opened.
    assert len(sent_while_reading_weights) >= 3
    assert sum(int(n) for n in sent_while_reading_weights) > 2 * 2**20
    assert max(len(p) for p in pieces) < 2**20 + 2**16
    members = unpacked(b"".join(pieces))
    assert {n: c for n, (c, _) in members.items()} == {f"job-1-adapter/{n}": d
                                                      for n, d in FILES.items()}
