"""A job's feed (`shared.job_feed`) served as server-sent events: the loop that both dialects'
streams share, and the wire format.

Each poll reads one page in a short session of its own, in the thread pool, and closes it
before it waits: a client that reads slowly, or not at all, holds a coroutine, never a
database connection. The wait is an async sleep. When the client disconnects, Starlette
cancels the response's task at its next await, which ends the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import Header, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool

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


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and X-Accel-Buffering: a proxy (nginx) must pass each event on as it comes.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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
            page: FeedPage | None = await run_in_threadpool(_read_in_session, scope, job_id,
                                                            cursor)
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
