"""An httpx client that connects only to addresses the URL policy allows.

Checking a host name and then letting the HTTP library resolve it again leaves a gap: a DNS
server can answer with a public address for the check and with 169.254.169.254 for the
connect (DNS rebinding). Here the resolution that is checked is the one connected to: the
network backend resolves, refuses the name if any address is refused, and opens the socket
to a checked address. TLS still verifies the certificate for, and sends SNI and Host with,
the URL's host name, because httpcore takes those from the URL, not from the socket.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpcore
import httpx

from shared.url_guard import UrlPolicy, resolve_allowed

TIMEOUT = httpx.Timeout(30.0, read=300.0)


class _PinnedBackend(httpcore.SyncBackend):
    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        # UrlRefused is not an httpcore error, so httpx lets it through to the caller as is.
        addresses = resolve_allowed(host, port, self._policy)
        error: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None  # resolve_allowed returns at least one address
        raise error


class PinnedTransport(httpx.HTTPTransport):
    """`httpx.HTTPTransport` whose connections go only to addresses `policy` allows; a
    refused host raises `shared.url_guard.UrlRefused` from `send`. No proxies: a proxy would
    resolve the name itself."""

    def __init__(self, policy: UrlPolicy) -> None:
        super().__init__(trust_env=False)
        # httpx has no public hook for httpcore's network backend; its pool is where httpcore
        # takes one. tests/worker/test_download_ssrf.py fails if this stops taking effect.
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("this httpx version has no _pool: cannot pin download connections")
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=_PinnedBackend(policy),
        )


def pinned_client(policy: UrlPolicy) -> httpx.Client:
    """A client for user-named URLs: pinned connections, no redirects followed (the caller
    checks each hop), no proxies or .netrc from the environment."""
    return httpx.Client(
        transport=PinnedTransport(policy),
        follow_redirects=False,
        trust_env=False,
        timeout=TIMEOUT,
    )
