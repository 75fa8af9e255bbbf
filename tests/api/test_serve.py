"""`tunery api --workers N`: the socket its workers share turns Nagle's algorithm off on every
connection, which `uvicorn --workers N`'s own socket does not (uvicorn issue #3149)."""

from __future__ import annotations

import asyncio
import socket
from multiprocessing.reduction import ForkingPickler

import uvicorn

from api.serve import APP, bind_tcp_listener


async def _accepted_nodelay(listener: socket.socket) -> int:
    """TCP_NODELAY of a connection asyncio accepts on `listener`, as a uvicorn worker does."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[int] = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await loop.create_server(Probe, sock=listener)
    host, port = listener.getsockname()[:2]
    _, writer = await asyncio.open_connection(host, port)
    try:
        return await asyncio.wait_for(accepted, 10)
    finally:
        writer.close()
        server.close()


def test_a_worker_gets_a_listener_whose_connections_have_tcp_nodelay() -> None:
    config = uvicorn.Config(APP, host="127.0.0.1", port=0, workers=2)
    listener = bind_tcp_listener(config)
    assert listener.proto == socket.IPPROTO_TCP and listener.get_inheritable()
    # What a spawned worker receives: the socket as multiprocessing pickles it.
    in_worker = ForkingPickler.loads(ForkingPickler.dumps(listener))
    listener.close()
    assert in_worker.proto == socket.IPPROTO_TCP
    assert asyncio.run(_accepted_nodelay(in_worker)) == 1
