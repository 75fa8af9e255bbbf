"""A TCP proxy in front of PostgreSQL that can simulate an outage as clients see it.

`cut()` resets every open connection and closes the listening socket, so new connections are
refused (ECONNREFUSED, as when the server is down); `restore()` listens again on the same port.
Threads in the test process are enough: the traffic is a few queries a second.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from tests.chaos.processes import free_port

_ACCEPT_POLL_S = 0.1
_CHUNK = 65536


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Event | None = None
        self.connections_accepted = 0

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(_ACCEPT_POLL_S)
        accepting = threading.Event()
        accepting.set()
        self._listener, self._accepting = listener, accepting
        threading.Thread(target=self._accept_loop, args=(listener, accepting),
                         name=f"proxy-accept-{self.port}", daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self._accepting is not None:
            self._accepting.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            doomed = list(self._sockets)
            self._sockets.clear()
        for sock in doomed:
            _reset(sock)

    def restore(self) -> None:
        if self.is_cut:
            self.start()

    def stop(self) -> None:
        self.cut()

    def _accept_loop(self, listener: socket.socket, accepting: threading.Event) -> None:
        while accepting.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if not accepting.is_set():  # cut() ran while we connected
                    _reset(client)
                    _reset(upstream)
                    return
                self._sockets.update((client, upstream))
                self.connections_accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(_CHUNK):
                dst.sendall(chunk)
        except OSError:
            pass
        with self._lock:
            self._sockets.discard(src)
            self._sockets.discard(dst)
        _reset(src)
        _reset(dst)


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a crashed server's kernel would, rather than an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
