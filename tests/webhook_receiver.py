"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records every request
and answers from a script of status codes, and the two verifiers a tenant would use on it,
`openai`'s `client.webhooks.unwrap` and `standardwebhooks.Webhook.verify`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from openai import OpenAI
from standardwebhooks import Webhook


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """Answers the n-th request with `statuses[n]`, 200 once they are used up. With
    `hold_first`, the first request is recorded and then left unanswered until `release()`
    (or its sender hangs up); with `hold_all`, every request is."""

    def __init__(self, statuses: Sequence[int] = (), *, hold_first: bool = False,
                 hold_all: bool = False) -> None:
        self.statuses = list(statuses)
        self.received: list[Received] = []
        self.released = threading.Event()
        self._hold_first = hold_first
        self._hold_all = hold_all
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.received.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body))
                    n = len(receiver.received)
                    status = receiver.statuses[n - 1] if n <= len(receiver.statuses) else 200
                if receiver._hold_all or (n == 1 and receiver._hold_first):
                    receiver.released.wait(120)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout_s: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.received)} requests of {count} after "
                                     f"{timeout_s} s")
            time.sleep(0.05)
        return list(self.received)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def receiver(statuses: Sequence[int] = (), *, hold_first: bool = False,
             hold_all: bool = False) -> Iterator[Receiver]:
    running = Receiver(statuses, hold_first=hold_first, hold_all=hold_all)
    try:
        yield running
    finally:
        running.close()


# Verifying needs no server: the client is built offline and only its webhooks helper used.
_OPENAI = OpenAI(api_key="not-used", base_url="http://127.0.0.1:9/v1", max_retries=0)


def verify_with_openai(received: Received, secret: str) -> Any:
    """The event as `openai`'s `client.webhooks.unwrap` reads it; raises
    `openai.InvalidWebhookSignatureError` when `secret` did not sign it."""
    return _OPENAI.webhooks.unwrap(received.body, received.headers, secret=secret)


def verify_with_standardwebhooks(received: Received, secret: str) -> Any:
    """The parsed body; raises `standardwebhooks.webhooks.WebhookVerificationError` when
    `secret` did not sign it."""
    return Webhook(secret).verify(received.body, received.headers)


def signed_by(received: Received, secret: str) -> bool:
    """Whether both verifiers accept `received` under `secret`, checking that they agree."""
    from openai import InvalidWebhookSignatureError
    from standardwebhooks.webhooks import WebhookVerificationError

    try:
        verify_with_openai(received, secret)
        by_openai = True
    except InvalidWebhookSignatureError:
        by_openai = False
    try:
        verify_with_standardwebhooks(received, secret)
        by_standard = True
    except WebhookVerificationError:
        by_standard = False
    assert by_openai == by_standard, (by_openai, by_standard)
    return by_openai
