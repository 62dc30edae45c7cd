"""The node's own CollectorRegistry (never prometheus-client's global one: tests start several
nodes' worth of collectors in one process, and the global one would mix them)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector


class NodeMetrics:
    def __init__(self) -> None:
        # auto_describe=False: collectors are not run at registration, only at scrape time.
        self.registry = CollectorRegistry(auto_describe=False)
        self.collectors: list[Collector] = []

    def register(self, collector: Any) -> Any:
        """Add a collector (an object with `collect()`); returns it, for one-line use."""
        self.registry.register(collector)
        self.collectors.append(collector)
        return collector

    def unregister(self, collector: Any) -> None:
        self.registry.unregister(collector)
        self.collectors.remove(collector)

    def exposition(self) -> bytes:
        """The Prometheus text format of every registered collector, now."""
        return generate_latest(self.registry)


__all__ = ["NodeMetrics"]
