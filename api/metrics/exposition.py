"""One scrape's answer: this process's metrics, or every API process's summed, and the
backlog read once for the scrape."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api.metrics.backlog import BacklogCollector
from api.metrics.processes import multiprocess_dir

# One per process: it holds the broker question that may still be out.
BACKLOG = BacklogCollector()


class ThisProcess(Collector):
    """Everything this process registered by default: its request metrics and, in a single
    process, Python's process and GC collectors."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def scrape() -> bytes:
    """The Prometheus text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path is not None:
        MultiProcessCollector(registry, path=path)
    else:
        registry.register(ThisProcess())
    registry.register(BACKLOG)
    return generate_latest(registry)
