"""Serving the app with uvicorn: one process, or N worker processes sharing one socket.

`tunery api --workers N` rather than `uvicorn --workers N`: uvicorn binds the socket it hands
its workers with the protocol number left at 0, accepted connections inherit it, and asyncio
turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say they are TCP. With Nagle on,
a response written in two parts (headers, then body) waits for the client's delayed ACK, so
every request on a kept-alive connection after the first takes ~40 ms more on Linux
(uvicorn issue #3149). One process (`uvicorn api.main:app`, as the API image runs) is not
affected: asyncio binds that socket itself.
"""

from __future__ import annotations

import socket

from api.metrics.processes import metric_files_for

APP = "api.main:app"
# On SIGTERM, requests still open this long after are cancelled: a job's event stream lasts
# as long as the job, and would otherwise hold the server up until its supervisor kills it
# (Docker waits 10 s). Its client reconnects and goes on where it stood. Dockerfile.api
# passes the same number to uvicorn.
GRACEFUL_SHUTDOWN_S = 5


def bind_tcp_listener(config: object) -> socket.socket:
    """uvicorn's listening socket for `config` (a `uvicorn.Config`), marked as TCP so that
    every connection accepted on it, in any worker, gets TCP_NODELAY."""
    sock: socket.socket = config.bind_socket()  # type: ignore[attr-defined]
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto == socket.IPPROTO_TCP:
        return sock
    marked = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    marked.set_inheritable(True)  # as bind_socket leaves it: the workers inherit it
    return marked


def serve(host: str, port: int, workers: int = 1, quiet: bool = False) -> None:
    """Serve the API until interrupted; `workers` > 1 starts that many processes. `quiet`:
    no access log and only uvicorn's warnings and errors."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    log_level = "warning" if quiet else "info"
    with metric_files_for(workers):
        if workers <= 1:
            uvicorn.run(APP, host=host, port=port, log_level=log_level, access_log=not quiet,
                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
            return
        config = uvicorn.Config(APP, host=host, port=port, workers=workers,
                                log_level=log_level, access_log=not quiet,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        Multiprocess(config, sockets=[bind_tcp_listener(config)]).run()
