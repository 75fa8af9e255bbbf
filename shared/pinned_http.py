"""An httpx client that connects only to addresses the URL policy allows: for every URL a
tenant names (dataset downloads in the worker, webhook deliveries).

Checking a host name and then letting the HTTP library resolve it again leaves a gap: a DNS
server can answer with a public address for the check and with 169.254.169.254 for the
connect (DNS rebinding). Here the resolution that is checked is the one connected to: the
network backend resolves, refuses the name if any address is refused, and opens the socket
to a checked address. TLS still verifies the certificate for, and sends SNI and Host with,
the URL's host name, because httpcore takes those from the URL, not from the socket.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from shared.url_guard import UrlPolicy, resolve_allowed

TIMEOUT = httpx.Timeout(30.0, read=300.0)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection that ends at `deadline` (time.monotonic()): every read and write waits at
    most until then. httpx's timeouts bound each read alone, so a peer that trickles a byte
    at a time could otherwise hold a request open for as long as it likes."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    def _left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise error("the request's deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname,
                                     self._left(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _PinnedBackend(httpcore.SyncBackend):
    def __init__(self, policy: UrlPolicy, deadline_s: float | None) -> None:
        self._policy = policy
        self._deadline_s = deadline_s

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        deadline = None if self._deadline_s is None else time.monotonic() + self._deadline_s
        # UrlRefused is not an httpcore error, so httpx lets it through to the caller as is.
        addresses = resolve_allowed(host, port, self._policy)
        error: httpcore.ConnectError | None = None
        for address in addresses:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise httpcore.ConnectTimeout("the request's deadline passed")
                timeout = left if timeout is None else min(timeout, left)
            try:
                stream = super().connect_tcp(address, port, timeout, local_address,
                                             socket_options)
            except httpcore.ConnectError as exc:
                error = exc
                continue
            return stream if deadline is None else _DeadlineStream(stream, deadline)
        assert error is not None  # resolve_allowed returns at least one address
        raise error


class PinnedTransport(httpx.HTTPTransport):
    """`httpx.HTTPTransport` whose connections go only to addresses `policy` allows; a
    refused host raises `shared.url_guard.UrlRefused` from `send`. No proxies: a proxy would
    resolve the name itself. With `deadline_s`, each connection lives at most that long."""

    def __init__(self, policy: UrlPolicy, deadline_s: float | None = None) -> None:
        super().__init__(trust_env=False)
        # httpx has no public hook for httpcore's network backend; its pool is where httpcore
        # takes one. tests/worker/test_download_ssrf.py fails if this stops taking effect.
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("this httpx version has no _pool: cannot pin download connections")
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=_PinnedBackend(policy, deadline_s),
        )


def pinned_client(policy: UrlPolicy, *, timeout: httpx.Timeout = TIMEOUT,
                  deadline_s: float | None = None) -> httpx.Client:
    """A client for user-named URLs: pinned connections, no redirects followed (the caller
    checks each hop, or takes a redirect as the answer), no proxies or .netrc from the
    environment. `deadline_s` bounds each connection's whole life, for a client that sends
    one request: a webhook delivery."""
    return httpx.Client(
        transport=PinnedTransport(policy, deadline_s),
        follow_redirects=False,
        trust_env=False,
        timeout=timeout,
    )
