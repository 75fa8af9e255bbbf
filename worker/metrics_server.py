"""Each worker process's /metrics (`TUNERY_WORKER_METRICS_PORT`): the metrics of
`worker.metrics` (GPU memory included) and Python's process collectors."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from shared.settings import Settings

log = logging.getLogger("tunery.worker")


def serve_worker_metrics(settings: Settings) -> bool:
    """Serve /metrics on the configured host and port, in a daemon thread; False when no port
    is configured or it cannot be bound (logged: the worker trains on without metrics)."""
    port, host = settings.metrics.worker_port, settings.metrics.worker_host
    if not port:
        return False
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.error("worker metrics not served: cannot listen on %s:%d (%s); set "
                  "TUNERY_WORKER_METRICS_PORT to a free port", host, port, exc)
        return False
    log.info("worker metrics served at http://%s:%d/metrics", host, port)
    return True
