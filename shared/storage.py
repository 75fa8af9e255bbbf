"""Object storage for datasets, checkpoints and adapters: one small interface, two backends.

`LocalStorage` keeps objects as files under one directory (the embedded default);
`S3Storage` keeps them in an S3-compatible bucket (AWS, MinIO). This module moves bytes and
knows no layout: keys are relative paths that `shared.storage_keys` builds, and `validate_key`
refuses anything that could escape the store root or confuse a URL.

boto3 is imported inside `S3Storage` only, so importing this module (and `api.main`) stays cheap.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import tempfile
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from shared.private_files import make_private_dir

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "InvalidKey",
    "LocalStorage",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageUnreachable",
    "StoredObject",
    "storage_from_settings",
    "validate_key",
]

# S3's own limit on a key, in UTF-8 bytes; keeping local keys under it keeps backends swappable.
MAX_KEY_BYTES = 1024
_FORBIDDEN_CHARS = {"\\": "a backslash", "#": "'#'", ";": "';'"}


@dataclass(frozen=True)
class StoredObject:
    key: str
    """Key relative to the store root (never includes an S3 prefix)."""
    size: int


class StorageError(Exception):
    """Storage failed or is unreachable; the message says what to check."""


class StorageUnreachable(StorageError):
    """The store did not answer: refused or dropped connections, timeouts, a server error or
    throttling. Worth retrying, unlike a missing bucket or a refused key, which stay wrong
    until someone fixes them (`shared.storage_retry` retries only this)."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class InvalidKey(StorageError, ValueError):
    """A key or prefix is malformed or could escape the store root.

    Also a ValueError so callers that validate input can treat it as bad input (400/422).
    """


@runtime_checkable
class Storage(Protocol):
    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file; readers never see a partial object."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def download_file(self, key: str, dest: Path) -> None:
        """Write the object to `dest` (parents created); `dest` is never left half-written."""
        ...

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object. Raises ObjectNotFound when called, not on the first `next()`,
        so an API route can answer 404 before it starts a 200 response."""
        ...

    def list(self, prefix: str) -> builtins.list[StoredObject]:
        """Objects whose key starts with `prefix` (plain string prefix, as in S3), sorted."""
        ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Delete one object; nothing happens when it does not exist."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix`, which must end with '/' (a whole "directory"),
        so that deleting ``a/1/`` can never touch ``a/10/``."""
        ...

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A time-limited GET URL, or None when the store has none (the API streams instead)."""
        ...

    def presigned_upload_url(self, key: str, expires_s: int) -> str | None:
        """A time-limited PUT URL, or None when the store has none (the API receives instead)."""
        ...

    def check(self) -> None:
        """Readiness probe: raises StorageError with a readable reason when unusable."""
        ...


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a safe relative object key, else raise InvalidKey.

    Refused: empty keys, absolute paths, empty / '.' / '..' segments (also when
    percent-encoded, even twice), backslashes, '#', ';', NUL and other control characters.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("storage key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"storage key is longer than {MAX_KEY_BYTES} bytes")
    # Check the key as given and every percent-decoding of it: a key is later put into URLs
    # and file paths, and some layer on the way may decode `%2e%2e` (or `%252e`) into `..`.
    seen = key
    for _ in range(4):
        _check_plain_key(key, seen)
        decoded = unquote(seen)
        if decoded == seen:
            return key
        seen = decoded
    raise InvalidKey(f"storage key {key!r} is percent-encoded too many times")


def _check_plain_key(original: str, key: str) -> None:
    for ch in key:
        if ch in _FORBIDDEN_CHARS:
            raise InvalidKey(f"storage key {original!r} must not contain {_FORBIDDEN_CHARS[ch]}")
        if unicodedata.category(ch) == "Cc":
            raise InvalidKey(f"storage key {original!r} must not contain control characters")
    if key.startswith("/"):
        raise InvalidKey(f"storage key {original!r} must be relative, not start with '/'")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(
                f"storage key {original!r} must not contain empty, '.' or '..' path segments"
            )


def _validate_prefix(prefix: str, *, for_delete: bool = False) -> str:
    """A prefix is '' (list only) or a key, optionally ending with '/'."""
    if prefix == "" and not for_delete:
        return prefix
    if for_delete and not prefix.endswith("/"):
        raise InvalidKey(f"delete_prefix needs a prefix ending with '/', got {prefix!r}")
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class LocalStorage(Storage):
    """Objects as files under `root`; the store for the one-machine setup and for tests.

    Objects are written 0600 (`mkstemp`'s mode, kept by the rename) in directories created
    0700: they are tenants' datasets and adapters.
    """

    # Uploads are written here first and moved into place with os.replace, which is atomic on
    # one filesystem; living under root guarantees that. list() hides it, keys may not use it.
    _PARTIAL_DIR = ".partial"

    def __init__(self, root: Path) -> None:
        # No filesystem access here: building a store must not fail; check() reports problems.
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == self._PARTIAL_DIR:
            raise InvalidKey(f"storage key {key!r} uses the reserved directory {self._PARTIAL_DIR}")
        # resolve() follows symlinks, so a link planted inside root cannot point outside it.
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise InvalidKey(f"storage key {key!r} resolves outside the storage root")
        return path

    def _write_atomically(self, path: Path, write: Any) -> None:
        partial = self.root / self._PARTIAL_DIR
        try:
            make_private_dir(partial)
            make_private_dir(path.parent)
            fd, tmp_name = tempfile.mkstemp(dir=partial, prefix="upload-")
        except OSError as exc:
            raise StorageError(f"cannot write to local storage {self.root}: {exc}") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                # Without fsync a crash after os.replace can leave a complete-looking empty file.
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path} in local storage: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        try:
            src = open(path, "rb")  # noqa: SIM115 - closed below, errors mapped first
        except OSError as exc:
            raise StorageError(f"cannot read {path} for upload: {exc}") from exc
        with src:
            self._write_atomically(dest, lambda out: shutil.copyfileobj(src, out, 1 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(self._path(key), lambda out: out.write(data))

    def download_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        dest = Path(dest)
        if not src.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self!r}")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            os.close(fd)
            try:
                shutil.copyfile(src, tmp_name)
                os.replace(tmp_name, dest)
            finally:
                Path(tmp_name).unlink(missing_ok=True)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key!r} in {self!r}") from exc
        except OSError as exc:
            raise StorageError(f"cannot download {key!r} to {dest}: {exc}") from exc

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - the generator below owns and closes it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object {key!r} in {self!r}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} from {self!r}: {exc}") from exc
        return _iter_file(handle, chunk_size)

    def list(self, prefix: str) -> builtins.list[StoredObject]:
        _validate_prefix(prefix)
        # Walk only the deepest directory the prefix names, then filter by string prefix so
        # "a/ab" matches "a/abc/x" exactly as S3 would.
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        found: builtins.list[StoredObject] = []
        for dirpath, dirnames, filenames in os.walk(base):
            if Path(dirpath) == self.root and self._PARTIAL_DIR in dirnames:
                dirnames.remove(self._PARTIAL_DIR)  # in-flight uploads are not objects yet
            for name in filenames:
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not key.startswith(f"{self._PARTIAL_DIR}/"):
                    with contextlib.suppress(FileNotFoundError):  # deleted while we walked
                        found.append(StoredObject(key=key, size=full.stat().st_size))
        return sorted(found, key=lambda obj: obj.key)

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self!r}")
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r} from {self!r}: {exc}") from exc

    def delete_prefix(self, prefix: str) -> None:
        _validate_prefix(prefix, for_delete=True)
        target = self._path(prefix[:-1])
        try:
            if target.is_dir():
                shutil.rmtree(target)
        except OSError as exc:
            raise StorageError(f"cannot delete {prefix!r} from {self!r}: {exc}") from exc

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        self._path(key)  # same refusal of bad keys as the S3 store
        return None

    def presigned_upload_url(self, key: str, expires_s: int) -> str | None:
        self._path(key)
        return None

    def check(self) -> None:
        # A real write proves more than os.access: read-only mounts, full disks, wrong owner.
        probe = f"{self._PARTIAL_DIR}/probe-{uuid.uuid4().hex}"
        try:
            make_private_dir(self.root / self._PARTIAL_DIR)
            (self.root / probe).write_bytes(b"ok")
            (self.root / probe).unlink()
        except OSError as exc:
            raise StorageError(f"local storage {self.root} is not writable: {exc}") from exc


def _iter_file(handle: Any, chunk_size: int) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


class S3Storage(Storage):
    """Objects in `bucket` under `prefix`, via boto3 against AWS or any S3-compatible endpoint.

    `public_endpoint_url` is the address clients use for presigned URLs when it differs from the
    one the service uses (in docker-compose the API reaches ``http://minio:9000``, a browser
    cannot). The bucket is never created implicitly: call `ensure_bucket()` (tests, setup).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        public_endpoint_url: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
    ) -> None:
        if not bucket:
            raise StorageError("S3 storage needs a bucket name (s3://bucket/prefix)")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url or None
        self.public_endpoint_url = public_endpoint_url or None
        self.region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Storage(s3://{self.bucket}/{self.prefix}{where})"

    def _make_client(self, endpoint_url: str | None, *, probe: bool = False) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            # MinIO and moto serve buckets under the path, not as subdomains of the endpoint.
            s3={"addressing_style": "path"},
            # A readiness probe must answer quickly. Data calls fail within two bounded waits
            # (the second try outlives a pooled connection the server closed): longer outages
            # are `shared.storage_retry`'s to ride out in a worker, and an API route answers
            # 503 instead of hanging.
            connect_timeout=min(2.0, self.connect_timeout_s) if probe else self.connect_timeout_s,
            read_timeout=min(5.0, self.read_timeout_s) if probe else self.read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": 1 if probe else 2},
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            config=config,
        )

    # Clients are built on first use so constructing a store (e.g. at API import) costs nothing;
    # boto3 clients are thread-safe, and a race here only builds one spare client.
    @cached_property
    def _client(self) -> Any:
        return self._make_client(self.endpoint_url)

    @cached_property
    def _probe_client(self) -> Any:
        return self._make_client(self.endpoint_url, probe=True)

    @cached_property
    def _presign_client(self) -> Any:
        if self.public_endpoint_url is None:
            return self._client
        # The signature covers the Host header, so sign against the host the client will use.
        return self._make_client(self.public_endpoint_url)

    def _full_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @cached_property
    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        # s3transfer retries a broken download 5 times by default, each try waiting the whole
        # read timeout: as with the client's own retries, longer outages are retried above.
        return TransferConfig(num_download_attempts=2)

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        target = f"{key!r} in {self!r}" if key is not None else repr(self)
        try:
            try:
                yield
            except S3UploadFailedError as exc:
                # upload_file wraps the ClientError it got; unwrap it to classify the cause.
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, ClientError):
                    raise cause from exc
                raise StorageUnreachable(f"cannot {action} {target}: {exc}") from exc
            except RetriesExceededError as exc:  # download_file's broken reads, each retried
                raise StorageUnreachable(f"cannot {action} {target}: {exc}") from exc
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("404", "NoSuchKey", "NotFound") and key is not None:
                raise ObjectNotFound(f"no object {target}") from exc
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}; "
                    f"create it (`aws s3 mb s3://{self.bucket}` or `mc mb`; docker-compose's "
                    "minio-init does)"
                ) from exc
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(
                    f"access denied to {action} {target}: check TUNERY_S3_ACCESS_KEY_ID / "
                    f"TUNERY_S3_SECRET_ACCESS_KEY ({code})"
                ) from exc
            message = error.get("Message") or str(exc)
            unreachable = status >= 500 or code in _UNREACHABLE_CODES
            kind = StorageUnreachable if unreachable else StorageError
            raise kind(f"cannot {action} {target}: {code} {message}") from exc
        except BotoCoreError as exc:
            # Connection refused or dropped, connect or read timeouts: the server is away.
            kind = StorageUnreachable if _is_network_error(exc) else StorageError
            raise kind(f"cannot {action} {target}: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        from botocore.exceptions import ClientError

        with self._errors("create bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket"):
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            # us-east-1 is S3's default and rejects an explicit LocationConstraint.
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self._client.create_bucket(**kwargs)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise

    def put_file(self, key: str, path: Path) -> None:
        full = self._full_key(key)
        if not Path(path).is_file():
            raise StorageError(f"cannot upload {path}: not a file")
        # upload_file switches to multipart for large files; S3 shows the object only once
        # the upload completes, so readers never see a partial adapter.
        with self._errors("upload", key):
            self._client.upload_file(str(path), self.bucket, full, Config=self._transfer_config)

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._full_key(key)
        with self._errors("upload", key):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data)

    def download_file(self, key: str, dest: Path) -> None:
        full = self._full_key(key)
        dest = Path(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {dest.parent}: {exc}") from exc
        # s3transfer writes to a temporary name and renames on success, so `dest` is atomic.
        with self._errors("download", key):
            self._client.download_file(self.bucket, full, str(dest), Config=self._transfer_config)

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        full = self._full_key(key)
        with self._errors("read", key):
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
        return self._iter_body(body, key, chunk_size)

    def _iter_body(self, body: Any, key: str, chunk_size: int) -> Iterator[bytes]:
        try:
            with self._errors("read", key):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def list(self, prefix: str) -> builtins.list[StoredObject]:
        _validate_prefix(prefix)
        found: builtins.list[StoredObject] = []
        with self._errors("list", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    found.append(StoredObject(obj["Key"][len(self.prefix) :], int(obj["Size"])))
        # S3 orders by UTF-8 bytes, Python by code point; sort here so both stores agree.
        return sorted(found, key=lambda obj: obj.key)

    def size(self, key: str) -> int:
        full = self._full_key(key)
        with self._errors("stat", key):
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def delete_prefix(self, prefix: str) -> None:
        _validate_prefix(prefix, for_delete=True)
        keys = [self.prefix + obj.key for obj in self.list(prefix)]
        with self._errors("delete", prefix):
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[start : start + 1000]]
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise StorageError(
                        f"cannot delete {len(response['Errors'])} objects under {prefix!r} in "
                        f"{self!r}, e.g. {first.get('Key')}: {first.get('Message')}"
                    )

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        full = self._full_key(key)
        with self._errors("presign", key):
            url: str = self._presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires_s
            )
        return url

    def presigned_upload_url(self, key: str, expires_s: int) -> str | None:
        full = self._full_key(key)
        # Content-Type and Content-Length are left unsigned: MonsterAPI clients PUT with
        # whatever their HTTP library sends. The size is checked when the upload is parsed.
        with self._errors("presign", key):
            url: str = self._presign_client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires_s
            )
        return url

    def check(self) -> None:
        with self._errors("reach bucket"):
            self._probe_client.head_bucket(Bucket=self.bucket)


# S3's answers that mean "not now" rather than "never": throttling and timeouts on its side.
_UNREACHABLE_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "ServiceUnavailable",
     "InternalError", "RequestTimeTooSkewed"}
)


def _is_network_error(exc: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    return isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError)


def storage_from_settings(settings: Settings) -> Storage:
    """The store named by `settings.storage.url` (``file:///abs/dir`` or ``s3://b/p``).

    Equal settings return the same store object: building a boto3 client costs ~0.2 s of CPU,
    too much to pay per request, and one client is safe to share between threads.
    """
    return _cached_store(
        settings.storage.url,
        settings.storage.s3_endpoint_url,
        settings.storage.s3_access_key_id,
        settings.storage.s3_secret_access_key,
        settings.storage.s3_region,
        settings.storage.s3_public_endpoint_url,
        settings.storage.connect_timeout_s,
        settings.storage.read_timeout_s,
    )


@lru_cache(maxsize=16)
def _cached_store(
    url: str,
    endpoint_url: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    region: str,
    public_endpoint_url: str | None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 15.0,
) -> Storage:
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"storage URL {url!r}: file URLs must be file:///absolute/dir")
        path = Path(url2pathname(parts.path))
        if not path.is_absolute():
            raise StorageError(f"storage URL {url!r}: the directory must be absolute")
        return LocalStorage(path)
    if parts.scheme == "s3":
        return S3Storage(
            parts.netloc,
            parts.path,
            endpoint_url=endpoint_url,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            region=region,
            public_endpoint_url=public_endpoint_url,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
        )
    raise StorageError(
        f"unsupported TUNERY_STORAGE_URL {url!r}: use file:///absolute/dir or s3://bucket/prefix"
    )


def storage_problem(exc: BaseException) -> str:
    """What a failed store call comes down to, for an operator who reads `/readyz`:
    ``unreachable`` (the endpoint refuses connections or does not answer in time),
    ``bucket_missing``, ``access_denied`` (wrong or unknown credentials, or a policy), or
    ``failing`` (anything else; the error's message says what). Looks through the chain of
    causes, since each `StorageError` wraps the library's error.
    """
    import sys

    # botocore is only loaded once an S3 store was used: before that, no error can be its.
    botocore_errors = sys.modules.get("botocore.exceptions")
    seen: BaseException | None = exc
    while seen is not None:
        if botocore_errors is not None:
            if isinstance(seen, (botocore_errors.ConnectionError,
                                 botocore_errors.HTTPClientError)):
                return "unreachable"
            if isinstance(seen, botocore_errors.ClientError):
                code = str(seen.response.get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchBucket"):
                    return "bucket_missing"
                if code in ("403", "AccessDenied", "InvalidAccessKeyId",
                            "SignatureDoesNotMatch"):
                    return "access_denied"
        if isinstance(seen, PermissionError):
            return "access_denied"
        seen = seen.__cause__
    return "failing"
