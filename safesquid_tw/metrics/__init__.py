"""Prometheus metrics of one node: its registry, the collectors that read its live counters,
and `GET /metrics` on the portal port.

Other parts of the node add their numbers by registering a collector on the node's registry:

    from safesquid_tw.metrics import NodeMetrics
    metrics: NodeMetrics = top.metrics        # the node's MultiService carries it
    metrics.register(MyCollector(my_counters))

A part that keeps a `stats()` dict of numbers needs no class of its own:

    from safesquid_tw.metrics.collectors import StatsCollector
    metrics.register(StatsCollector("icap", scanner))   # safesquid_icap_<key> per entry

A collector is any object with `collect()` yielding prometheus_client metric families (see
`safesquid_tw.metrics.collectors` for examples). It runs at scrape time on the reactor thread,
so it may read plain attributes of the node without locks, and must be quick: no disk, no
network. Keep the per-request path to plain integer updates; turn them into families here.
"""

from __future__ import annotations

from safesquid_tw.metrics.registry import NodeMetrics

__all__ = ["NodeMetrics"]
