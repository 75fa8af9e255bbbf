"""Request body limits, enforced while the body arrives.

Content-Length is only a first check: the bytes are counted as the server hands them over, so
a client that understates Content-Length or sends chunked gets no more through. Request bodies
are never decompressed: one sent with a Content-Encoding is refused, because its size on the
wire says nothing about what it would expand to.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import OPENAI_PATHS, error_body, openai_error


class _BodyTooLarge(Exception):
    """Raised into the app from `receive`; the middleware answers 413 in its place."""


def _too_large(scope: Scope, max_bytes: int) -> JSONResponse:
    message = f"the request body is larger than the {max_bytes} bytes this route accepts"
    return _error(scope, 413, "payload_too_large", message)


def _encoded(scope: Scope, encoding: str) -> JSONResponse:
    message = (f"request bodies with Content-Encoding {encoding!r} are not accepted; "
               "send the body uncompressed")
    return _error(scope, 415, "unsupported_media_type", message)


def _error(scope: Scope, status: int, code: str, message: str) -> JSONResponse:
    if str(scope.get("path", "")).startswith(OPENAI_PATHS):
        return openai_error(status, code, message)
    return JSONResponse(error_body(code, message), status)


class RequestBodyLimit:
    """ASGI middleware: 413 for a body over `limit_for(scope)` bytes, 415 for a compressed
    body."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await _encoded(scope, encoding)(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(scope, limit)(scope, receive, send)
            return

        received = 0
        exceeded = started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def send_unless_exceeded(message: Message) -> None:
            nonlocal started
            # Whatever the app answers to the exception (FastAPI turns it into a 400) is
            # dropped: the client gets the 413 below.
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, send_unless_exceeded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _too_large(scope, limit)(scope, receive, send)
