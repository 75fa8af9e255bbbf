"""What passes between the HTTP layer and the engine's thread: a submitted request, the
channel its answer comes back on, and the events on it."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Literal

from inference.protocol import FinishReason, RequestRefused
from inference.sampling import SamplingParams


@dataclass(frozen=True)
class Accepted:
    """The request is valid and queued: its prompts' tokens, counted once per prompt."""

    prompt_tokens: int


@dataclass(frozen=True)
class Refused:
    error: RequestRefused


@dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """Choice `index` ended; `token_ids` are all it generated (an EOS that ended it too)."""

    index: int
    reason: FinishReason
    token_ids: list[int]

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


Event = Accepted | Refused | Delta | Finished


class Channel:
    """Events from the engine's thread to one request's coroutine. The coroutine calls
    `cancel` when its client is gone; the engine then drops the request's rows."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    def send(self, event: Event) -> None:
        """Called from the engine's thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    async def receive(self) -> Event:
        return await self._queue.get()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class Submission:
    """One HTTP request for the engine: chat (`prompts` holds one conversation) or
    completions (`prompts` holds texts), each prompt answered with `n` choices."""

    kind: Literal["chat", "completion"]
    model: str
    prompts: list[Any]
    tools: list[dict[str, Any]] | None
    n: int
    max_tokens: int | None
    sampling: SamplingParams
    stop: list[str]
    channel: Channel
    # How the request named its max_tokens, for errors (chat: or max_completion_tokens).
    max_tokens_param: str = "max_tokens"

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"
