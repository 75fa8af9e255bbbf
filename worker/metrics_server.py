"""Each worker process's /metrics (`TUNERY_WORKER_METRICS_PORT`): the metrics of
`worker.metrics`, Python's process collectors, and the GPU memory read at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.settings import Settings

log = logging.getLogger("tunery.worker")


class GpuMemoryCollector(Collector):
    """Memory torch's caching allocator holds on each CUDA device, read when Prometheus
    scrapes: allocated (tensors) and reserved (allocated plus the cache kept for reuse, what
    other processes cannot have). Nothing on a worker without CUDA."""

    def collect(self) -> Iterator[Metric]:
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily(
            "tunery_worker_gpu_memory_allocated_bytes", "GPU memory held by tensors, per "
            "device.", labels=["device"])
        reserved = GaugeMetricFamily(
            "tunery_worker_gpu_memory_reserved_bytes", "GPU memory torch's allocator holds "
            "(tensors and its cache), per device.", labels=["device"])
        # Both read 0 until this process first uses a device; none of these calls creates a
        # CUDA context.
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
            reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved


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
    REGISTRY.register(GpuMemoryCollector())
    log.info("worker metrics served at http://%s:%d/metrics", host, port)
    return True
