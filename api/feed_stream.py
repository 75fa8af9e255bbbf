"""A job's feed (`shared.job_feed`) served as server-sent events: the loop that both dialects'
streams share, and the wire format.

Each poll reads one page in a short session of its own, on a few threads that only streams
use (`TUNERY_STREAM_READ_THREADS`), and closes it before it waits: a client that reads
slowly, or not at all, holds a coroutine, never a database connection, and a crowd of streams
reads more slowly instead of taking the threads and connections other requests need. The wait
is an async sleep. When the client disconnects, Starlette cancels the response's task at its
next await, which ends the loop. One key holds at most `TUNERY_STREAM_MAX_PER_KEY` streams.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import Header, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.errors import ApiError
from shared.db import session_factory
from shared.job_feed import FeedCursor, FeedPage, MalformedCursor, read_feed
from shared.jobs import JobNotFound
from shared.settings import StreamSettings
from shared.tenancy import Scope

log = logging.getLogger("tunery.api")

LAST_EVENT_ID = "Last-Event-ID"
PING = ": ping\n\n"

_CURSOR_HELP = ("The `id` of the last event received: the stream goes on with the event after "
                "it. Opaque; without it the stream starts from the job's first row.")
LastEventIdHeader = Annotated[str | None, Header(alias=LAST_EVENT_ID, description=_CURSOR_HELP)]
LastEventIdQuery = Annotated[str | None, Query(
    description=f"The same as the {LAST_EVENT_ID} header (which wins), for clients that cannot "
                "set headers.")]

RenderPage = Callable[[FeedPage], str]
"""The events a page reads as, in one dialect: SSE text, empty when there is nothing to say."""


def sse_response(description: str, events: list[str] | None = None,
                 data: str = "One JSON object on one line.") -> dict[int | str, Any]:
    """The OpenAPI `responses` entry of a route that answers 200 with server-sent events:
    the schema each event follows, `events` its names (None: events without one), `data`
    what each event carries."""
    event: dict[str, Any] = {"type": "string", "enum": events} if events else {
        "type": "string", "description": "Not sent."}
    return {200: {"description": description, "content": {"text/event-stream": {"schema": {
        "type": "object",
        "description": "One server-sent event; `: ping` comments keep an idle stream open.",
        "properties": {
            "event": event,
            "id": {"type": "string", "description": "The cursor after this event: send it back "
                                                    f"as {LAST_EVENT_ID} to resume."},
            "data": {"type": "string", "description": data},
        },
        "required": ["data"],
    }}}}}


def sse_event(data: str, *, event: str | None = None, event_id: str | None = None) -> str:
    """One server-sent event. `data` must be one line: JSON as pydantic and `json` write it
    (a newline inside a string is escaped) is."""
    head = (f"event: {event}\n" if event else "") + (
        f"id: {event_id}\n" if event_id is not None else "")
    return f"{head}data: {data}\n\n"


def resume_cursor(header: str | None, query: str | None) -> FeedCursor:
    """Where a stream starts: the `Last-Event-ID` header, else the `last_event_id` query (the
    header wins: a browser's EventSource sends it when it reconnects to the URL it was first
    given), else the job's first row. 400 naming Last-Event-ID for one this server did not
    hand out."""
    text = header if header else query
    if not text:
        return FeedCursor()
    try:
        return FeedCursor.parse(text)
    except MalformedCursor as exc:
        raise ApiError(400, "invalid_request", f"{LAST_EVENT_ID}: {exc}",
                       [{"path": LAST_EVENT_ID, "message": str(exc)}]) from None


class OpenStreams:
    """The streams each API key holds open in this process.

    A stream counts for as long as its event generator exists: the registry keeps weak
    references only, so a stream that ended, was cut off, or whose response never started is
    forgotten once the server drops it, with nothing to release by hand.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, weakref.WeakSet[AsyncIterator[str]]] = {}

    def hold(self, key_id: str, events: AsyncIterator[str], limit: int) -> None:
        """Count `events` as one of `key_id`'s streams; 429 when it holds `limit` already."""
        with self._lock:
            held = self._by_key.setdefault(key_id, weakref.WeakSet())
            if len(held) >= limit:
                raise ApiError(429, "too_many_streams",
                               f"this API key has {len(held)} streams open, the most it may "
                               f"hold at once (TUNERY_STREAM_MAX_PER_KEY); close one first",
                               headers={"Retry-After": "5"})
            held.add(events)
            for key in [k for k, streams in self._by_key.items() if not streams]:
                del self._by_key[key]


OPEN_STREAMS = OpenStreams()


def event_stream(events: AsyncIterator[str], key_id: str,
                 settings: StreamSettings) -> StreamingResponse:
    """The response that sends `events`, held as one of `key_id`'s open streams."""
    OPEN_STREAMS.hold(key_id, events, settings.max_per_key)
    # no-cache and X-Accel-Buffering: a proxy (nginx) must pass each event on as it comes.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# One per event loop: a limiter belongs to the loop it was made on (tests run several).
_READ_LIMITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary())


def _read_limiter(threads: int) -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    limiter = _READ_LIMITERS.get(loop)
    if limiter is None:
        limiter = _READ_LIMITERS[loop] = anyio.CapacityLimiter(threads)
    return limiter


async def follow_feed(scope: Scope, job_id: str, cursor: FeedCursor, render: RenderPage,
                      settings: StreamSettings) -> AsyncIterator[str]:
    """`render`'s text for each page of the job's feed from `cursor`, until the page that ends
    it (the job finished, every row sent); `: ping` after `settings.heartbeat_s` of silence.

    A database that cannot be reached is waited for: the stream stays open, pinging, and goes
    on from the same cursor once a read succeeds.
    """
    last_sent = time.monotonic()
    while True:
        try:
            page: FeedPage | None = await anyio.to_thread.run_sync(
                _read_in_session, scope, job_id, cursor,
                limiter=_read_limiter(settings.read_threads))
        except JobNotFound:
            return  # deleted while followed
        except (OperationalError, PoolTimeout) as exc:
            log.warning("job %s stream: database unavailable, retrying: %s", job_id, exc)
            page = None
        if page is not None:
            cursor = page.cursor
            text = render(page)
            if text:
                yield text
                last_sent = time.monotonic()
            if page.ended:
                return
            if not page.drained:
                continue
        if time.monotonic() - last_sent >= settings.heartbeat_s:
            yield PING
            last_sent = time.monotonic()
        await anyio.sleep(settings.poll_s)


def _read_in_session(scope: Scope, job_id: str, cursor: FeedCursor) -> FeedPage:
    with session_factory()() as session:
        return read_feed(session, scope, job_id, cursor)
