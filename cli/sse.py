"""Reading server-sent events (`text/event-stream`) as a browser's EventSource does: fields
`event`, `data` and `id`, an event dispatched at each blank line, comments skipped."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServerSentEvent:
    name: str
    """The `event:` field; "message" when the event has none."""
    data: str
    id: str | None = None
    """The event's own `id:` field, if it had one."""

    def json(self) -> Any:
        return json.loads(self.data)


def read_events(lines: Iterable[str], *, comments: bool = False) -> Iterator[ServerSentEvent]:
    """The events in `lines` (the stream split at its line ends), as each one completes; with
    `comments`, each comment line too, as an event named ":" (a server's keep-alive pings)."""
    name, event_id = "", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(name or "message", "\n".join(data), event_id)
            name, data, event_id = "", [], None
            continue
        if line.startswith(":"):
            if comments:
                yield ServerSentEvent(":", line[1:].strip())
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            event_id = value
