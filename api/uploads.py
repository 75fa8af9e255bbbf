"""Receiving files: a request body streamed to disk in chunks, never held in memory, and cut
off with 413 as soon as it passes the size limit.

FastAPI's `UploadFile` would spool the whole body to a temporary file before the route runs,
with no limit, so a client could fill the disk; these functions read `request.stream()`
themselves and stop at the limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Part headers and boundaries around the file; a body longer than the limit plus this cannot
# hold a file within the limit.
MULTIPART_OVERHEAD = 64 * 1024
# The longest text form field taken beside a file (OpenAI's `purpose`).
MAX_TEXT_FIELD = 256


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    filename: str | None
    content_type: str | None
    size: int
    form: dict[str, str] = field(default_factory=dict)
    """The text form fields that came with the file (`text_fields` of the receiver)."""
    sha256: str = ""
    """SHA-256 of the file's bytes, computed as they streamed in (an upload's identity for
    its `Idempotency-Key`)."""


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the file is larger than the {max_bytes} bytes this server accepts")


def refuse_long_body(request: Request, max_bytes: int) -> None:
    """413 at once when Content-Length already says the body is too long."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)


async def receive_body(request: Request, dest: Path, max_bytes: int) -> int:
    """Write the raw request body to `dest`; returns its size."""
    refuse_long_body(request, max_bytes)
    size = 0
    # Plain blocking writes: one ASGI chunk (~64 KiB) to local disk takes microseconds,
    # less than handing each chunk to a thread would.
    with dest.open("wb") as out:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large(max_bytes)
            out.write(chunk)
    return size


async def receive_multipart_file(
    request: Request, dest: Path, max_bytes: int, field: str = "file",
    text_fields: Collection[str] = (),
) -> ReceivedFile:
    """Write the one file sent as form field `field` to `dest`; the `text_fields` that come
    with it (each at most MAX_TEXT_FIELD bytes of UTF-8) are in `form`.

    Any other form field is refused (422 naming it), as unknown JSON fields are.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with the file in the form field {field!r}")
    refuse_long_body(request, max_bytes + MULTIPART_OVERHEAD)
    part = _FilePart(dest, field, max_bytes, text_fields)
    parser = MultipartParser(params[b"boundary"], part.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(422, "invalid_request", f"invalid multipart body: {exc}") from None
    finally:
        part.close()
    if part.size is None:
        raise ApiError(422, "invalid_request", f"no file in the form field {field!r}",
                       [{"path": field, "message": "field required"}])
    return ReceivedFile(dest, part.filename, part.content_type, part.size, part.text_values(),
                        part.digest.hexdigest())


class _FilePart:
    """python-multipart callbacks that write the file part to disk as it arrives."""

    def __init__(self, dest: Path, field: str, max_bytes: int,
                 text_fields: Collection[str] = ()) -> None:
        self.dest, self.field, self.max_bytes = dest, field, max_bytes
        self.text_fields = frozenset(text_fields)
        self.texts: dict[str, bytearray] = {}
        self._text: bytearray | None = None
        self.headers: dict[bytes, bytes] = {}
        self._name, self._value = b"", b""
        self.out: IO[bytes] | None = None
        self.filename: str | None = None
        self.content_type: str | None = None
        self.size: int | None = None
        self.digest = hashlib.sha256()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.close,
        }

    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._text = None
        if name in self.text_fields and b"filename" not in options:
            if name in self.texts:
                raise ApiError(422, "invalid_request", f"send the form field {name!r} once",
                               [{"path": name, "message": "sent more than once"}])
            self._text = self.texts[name] = bytearray()
            return
        if name != self.field:
            raise ApiError(422, "invalid_request",
                           f"unknown form field {name!r}; send the file as {self.field!r}",
                           [{"path": name or "body", "message": "unknown field"}])
        if self.size is not None:
            raise ApiError(422, "invalid_request", f"send one file in {self.field!r}, not several")
        filename = options.get(b"filename")
        self.filename = filename.decode("utf-8", "replace") if filename else None
        content_type = self.headers.get(b"content-type")
        self.content_type = content_type.decode("latin-1") if content_type else None
        self.out = self.dest.open("wb")
        self.size = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_TEXT_FIELD:
                raise ApiError(422, "invalid_request", "a form field is too long",
                               [{"path": "form", "message": f"at most {MAX_TEXT_FIELD} bytes"}])
            return
        assert self.out is not None and self.size is not None
        self.size += end - start
        if self.size > self.max_bytes:
            raise too_large(self.max_bytes)
        self.out.write(data[start:end])
        self.digest.update(data[start:end])

    def text_values(self) -> dict[str, str]:
        values = {}
        for name, raw in self.texts.items():
            try:
                values[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(422, "invalid_request", f"{name}: not UTF-8 text",
                               [{"path": name, "message": "not UTF-8 text"}]) from None
        return values

    def close(self) -> None:
        self._text = None
        if self.out is not None:
            self.out.close()
            self.out = None
