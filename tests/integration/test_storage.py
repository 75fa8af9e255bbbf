"""The storage contract, proven against both backends: a local directory and a real S3 endpoint."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from shared.storage import (
    InvalidKey,
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    StorageUnreachable,
    StoredObject,
    storage_from_settings,
    validate_key,
)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    store: S3Storage = request.getfixturevalue("s3_storage")
    return store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_put_bytes_round_trips_through_iter_bytes_and_download(
    storage: Storage, tmp_path: Path
) -> None:
    storage.put_bytes("jobs/j1/adapter_config.json", b'{"r": 8}')

    assert b"".join(storage.iter_bytes("jobs/j1/adapter_config.json")) == b'{"r": 8}'
    dest = tmp_path / "out" / "nested" / "adapter_config.json"
    storage.download_file("jobs/j1/adapter_config.json", dest)
    assert dest.read_bytes() == b'{"r": 8}'


def test_put_file_round_trips_a_multi_megabyte_file(storage: Storage, tmp_path: Path) -> None:
    # 12 MiB crosses boto3's 8 MiB multipart threshold, so S3 takes the multipart path.
    src = tmp_path / "adapter_model.safetensors"
    src.write_bytes(os.urandom(12 * 1024 * 1024 + 123))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()

    storage.put_file("jobs/j1/adapter_model.safetensors", src)

    dest = tmp_path / "downloaded.safetensors"
    storage.download_file("jobs/j1/adapter_model.safetensors", dest)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    assert storage.size("jobs/j1/adapter_model.safetensors") == src.stat().st_size
    chunks = list(storage.iter_bytes("jobs/j1/adapter_model.safetensors", chunk_size=1 << 20))
    assert max(len(c) for c in chunks) <= 1 << 20
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == digest


def test_put_overwrites_an_existing_object(storage: Storage) -> None:
    storage.put_bytes("jobs/j1/metrics.json", b"old and longer")
    storage.put_bytes("jobs/j1/metrics.json", b"new")

    assert b"".join(storage.iter_bytes("jobs/j1/metrics.json")) == b"new"
    assert storage.size("jobs/j1/metrics.json") == 3


def test_list_returns_sorted_relative_keys_under_the_prefix_only(storage: Storage) -> None:
    storage.put_bytes("jobs/b/logs.txt", b"12345")
    storage.put_bytes("jobs/a/adapter_model.safetensors", b"xx")
    storage.put_bytes("jobs/a/adapter_config.json", b"{}")
    storage.put_bytes("datasets/d1/train.jsonl", b"{}\n")

    assert storage.list("jobs/a/") == [
        StoredObject("jobs/a/adapter_config.json", 2),
        StoredObject("jobs/a/adapter_model.safetensors", 2),
    ]
    assert [o.key for o in storage.list("jobs/")] == [
        "jobs/a/adapter_config.json",
        "jobs/a/adapter_model.safetensors",
        "jobs/b/logs.txt",
    ]
    assert [o.key for o in storage.list("")][0] == "datasets/d1/train.jsonl"
    assert storage.list("nothing/") == []


def test_list_prefix_is_a_plain_string_prefix_like_s3(storage: Storage) -> None:
    storage.put_bytes("jobs/1/a", b"1")
    storage.put_bytes("jobs/10/a", b"10")

    assert [o.key for o in storage.list("jobs/1")] == ["jobs/1/a", "jobs/10/a"]
    assert [o.key for o in storage.list("jobs/1/")] == ["jobs/1/a"]


def test_size_and_exists_report_stored_objects(storage: Storage) -> None:
    storage.put_bytes("jobs/j1/logs.txt", b"hello")

    assert storage.size("jobs/j1/logs.txt") == 5
    assert storage.exists("jobs/j1/logs.txt")
    assert not storage.exists("jobs/j1/missing.txt")
    # A "directory" is not an object in either backend.
    assert not storage.exists("jobs/j1")


def test_missing_objects_raise_object_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        storage.size("jobs/nope/adapter_model.safetensors")
    dest = tmp_path / "dest.bin"
    with pytest.raises(ObjectNotFound):
        storage.download_file("jobs/nope/adapter_model.safetensors", dest)
    assert not dest.exists()


def test_iter_bytes_raises_object_not_found_before_the_first_chunk(storage: Storage) -> None:
    # Eager, so an API route can answer 404 instead of starting a 200 stream that then fails.
    with pytest.raises(ObjectNotFound):
        storage.iter_bytes("jobs/nope/adapter_model.safetensors")


def test_delete_prefix_removes_that_prefix_and_nothing_else(storage: Storage) -> None:
    storage.put_bytes("jobs/1/adapter_model.safetensors", b"a")
    storage.put_bytes("jobs/1/checkpoints/step-10/state.pt", b"b")
    storage.put_bytes("jobs/10/adapter_model.safetensors", b"c")

    storage.delete_prefix("jobs/1/")

    assert [o.key for o in storage.list("jobs/")] == ["jobs/10/adapter_model.safetensors"]
    storage.delete_prefix("jobs/never-existed/")  # deleting nothing is not an error


def test_delete_removes_one_object_and_not_its_namesakes(storage: Storage) -> None:
    storage.put_bytes("checkpoints/1/step-5/optimizer.pt", b"a")
    storage.put_bytes("checkpoints/1/step-5/optimizer.pt.old", b"b")

    storage.delete("checkpoints/1/step-5/optimizer.pt")
    storage.delete("checkpoints/1/step-5/never-existed")  # deleting nothing is not an error

    assert [o.key for o in storage.list("checkpoints/")] == [
        "checkpoints/1/step-5/optimizer.pt.old"]
    with pytest.raises(InvalidKey):
        storage.delete("../outside")


def test_delete_prefix_refuses_a_prefix_without_trailing_slash(storage: Storage) -> None:
    storage.put_bytes("jobs/10/a", b"x")

    for prefix in ("jobs/1", "", "/", "../"):
        with pytest.raises(InvalidKey):
            storage.delete_prefix(prefix)
    assert storage.exists("jobs/10/a")


def test_presigned_url_is_downloadable_with_plain_http_get(s3_storage: S3Storage) -> None:
    s3_storage.put_bytes("jobs/j1/adapter_model.safetensors", b"weights")

    url = s3_storage.presigned_url("jobs/j1/adapter_model.safetensors", expires_s=60)

    assert url is not None and "X-Amz-Signature=" in url
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == b"weights"


def test_presigned_url_is_signed_for_the_public_endpoint_when_one_is_set(
    s3_credentials: dict[str, str],
) -> None:
    # No network: presigning is local computation.
    store = S3Storage(
        "tunery",
        endpoint_url="http://minio:9000",
        public_endpoint_url="https://files.example.com",
        **s3_credentials,
    )
    url = store.presigned_url("jobs/j1/adapter_model.safetensors", expires_s=60)
    assert url is not None
    assert url.startswith("https://files.example.com/tunery/jobs/j1/adapter_model.safetensors?")


def test_local_presigned_url_is_none_so_the_api_streams(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("jobs/j1/adapter_model.safetensors", b"w")
    assert store.presigned_url("jobs/j1/adapter_model.safetensors", expires_s=60) is None


def test_check_passes_on_a_usable_store(storage: Storage) -> None:
    storage.check()
    assert storage.list("") == []  # the probe leaves nothing behind


def test_s3_check_fails_fast_with_storage_error_when_endpoint_is_down(
    s3_credentials: dict[str, str],
) -> None:
    store = S3Storage("tunery", endpoint_url=f"http://127.0.0.1:{_free_port()}", **s3_credentials)
    started = time.monotonic()
    with pytest.raises(StorageError, match="reach bucket"):
        store.check()
    assert time.monotonic() - started < 5, "a readiness probe must not retry for long"


def test_s3_check_fails_with_storage_error_when_bucket_is_missing(
    s3_endpoint_url: str, s3_credentials: dict[str, str]
) -> None:
    store = S3Storage("no-such-bucket", endpoint_url=s3_endpoint_url, **s3_credentials)
    with pytest.raises(StorageError, match="does not exist"):
        store.check()


def test_s3_calls_to_a_down_endpoint_raise_storage_unreachable(
    s3_credentials: dict[str, str], tmp_path: Path
) -> None:
    store = S3Storage("tunery", endpoint_url=f"http://127.0.0.1:{_free_port()}", **s3_credentials)
    (tmp_path / "f").write_bytes(b"x")
    for call in (lambda: store.put_file("a/f", tmp_path / "f"), lambda: store.put_bytes("a/b", b""),
                 lambda: store.list("a/"), lambda: store.download_file("a/f", tmp_path / "g")):
        with pytest.raises(StorageUnreachable):
            call()


def test_s3_calls_to_a_missing_bucket_are_not_retried_as_unreachable(
    s3_endpoint_url: str, s3_credentials: dict[str, str], tmp_path: Path
) -> None:
    store = S3Storage("no-such-bucket", endpoint_url=s3_endpoint_url, **s3_credentials)
    (tmp_path / "f").write_bytes(b"x")
    for call in (lambda: store.put_file("a/f", tmp_path / "f"), lambda: store.list("a/")):
        with pytest.raises(StorageError) as raised:
            call()
        assert not isinstance(raised.value, StorageUnreachable), raised.value


def test_s3_call_to_a_server_that_never_answers_fails_within_its_read_timeouts(
    s3_credentials: dict[str, str],
) -> None:
    # A listening socket nobody reads: connections are accepted (by the kernel), as by a
    # hung S3 server, and no answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        store = S3Storage("tunery", endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                          connect_timeout_s=1, read_timeout_s=1, **s3_credentials)
        started = time.monotonic()
        with pytest.raises(StorageUnreachable, match="timeout"):
            store.list("a/")
        took = time.monotonic() - started
    print(f"a hung S3 failed a call after {took:.2f} s (read timeout 1 s, two tries)")
    assert took < 10


def test_local_check_fails_with_storage_error_when_root_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "not-a-dir"
    root.write_text("x")
    with pytest.raises(StorageError, match="not writable"):
        LocalStorage(root).check()


def test_s3_store_sees_only_objects_under_its_own_prefix(
    s3_storage: S3Storage, s3_credentials: dict[str, str]
) -> None:
    sibling = S3Storage(
        s3_storage.bucket,
        "other-root",
        endpoint_url=s3_storage.endpoint_url,
        **s3_credentials,
    )
    sibling.put_bytes("jobs/j1/a", b"sibling")
    s3_storage.put_bytes("jobs/j1/a", b"mine")

    assert s3_storage.list("") == [StoredObject("jobs/j1/a", 4)]
    s3_storage.delete_prefix("jobs/")
    assert sibling.exists("jobs/j1/a")


BAD_KEYS = [
    "../x",
    "a/../../b",
    "/etc/passwd",
    "%2e%2e/x",
    "%252e%252e/x",
    "a%2f..%2fb",
    "a#b",
    "a;b",
    "a\\b",
    "a/./b",
    "",
    "a//b",
    "a/",
    "a\x00b",
    "a\nb",
    "a%00b",
    "x" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_refuses_unsafe_keys(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "jobs/3f0c9a2e-1b7d-4e8a-9c1d-2f3e4a5b6c7d/adapter_model.safetensors",
        "datasets/d1/train data (v2).jsonl",
        "jobs/j1/checkpoints/step-100/optimizer.pt",
        "reports/100%.json",
        "..hidden/x..y",
    ],
)
def test_validate_key_accepts_server_built_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "%2e%2e/x", "a\\b"])
def test_every_operation_refuses_unsafe_keys(storage: Storage, tmp_path: Path, key: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    calls = [
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.put_file(key, src),
        lambda: storage.download_file(key, tmp_path / "d"),
        lambda: storage.iter_bytes(key),
        lambda: storage.size(key),
        lambda: storage.exists(key),
        lambda: storage.presigned_url(key, 60),
    ]
    for call in calls:
        with pytest.raises(InvalidKey):
            call()


def test_local_storage_refuses_a_symlink_that_leads_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside"
    (root / "jobs").mkdir(parents=True)
    outside.mkdir()
    (root / "jobs" / "evil").symlink_to(outside, target_is_directory=True)
    store = LocalStorage(root)

    with pytest.raises(InvalidKey, match="outside the storage root"):
        store.put_bytes("jobs/evil/x", b"x")
    assert list(outside.iterdir()) == []


def test_local_storage_hides_in_flight_uploads_from_list(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("jobs/j1/a", b"x")
    (tmp_path / ".partial").mkdir(exist_ok=True)
    (tmp_path / ".partial" / "upload-123").write_bytes(b"half")

    assert [o.key for o in store.list("")] == ["jobs/j1/a"]
    with pytest.raises(InvalidKey):
        store.put_bytes(".partial/upload-123", b"x")


def test_storage_from_settings_builds_the_store_the_url_names(tmp_path: Path) -> None:
    local = storage_from_settings(Settings(data_dir=tmp_path, storage_url=tmp_path.as_uri()))
    assert isinstance(local, LocalStorage) and local.root == tmp_path.resolve()

    s3 = storage_from_settings(
        Settings(
            data_dir=tmp_path,
            storage_url="s3://tunery/deploy-a/",
            s3_endpoint_url="http://minio:9000",
        )
    )
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("tunery", "deploy-a/", "http://minio:9000")

    again = Settings(
        data_dir=tmp_path, storage_url="s3://tunery/deploy-a/", s3_endpoint_url="http://minio:9000"
    )
    assert storage_from_settings(again) is s3, "one boto3 client per configuration, not per call"

    for url in ("ftp://host/x", "file://relative/dir", "s3:///no-bucket"):
        with pytest.raises(StorageError):
            storage_from_settings(Settings(data_dir=tmp_path, storage_url=url))


def test_importing_storage_does_not_import_boto3_or_torch() -> None:
    code = (
        "import sys, shared.storage; "
        "print(sorted(m for m in ('boto3', 'botocore', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
