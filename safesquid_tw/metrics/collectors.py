"""Collectors that turn a node's live counters into metric families at scrape time.

Each reads plain attributes of one part of the node; none keeps state of its own. Names follow
Prometheus conventions: `safesquid_` prefix, `_total` for counters (added by the library),
base units (seconds, bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)


class NodeCollector:
    """Who this node is and whether it takes traffic."""

    def __init__(self, state: Any, product_version: str) -> None:
        self.state = state
        self.product_version = product_version

    def collect(self) -> Iterator[Metric]:
        state = self.state
        yield InfoMetricFamily("safesquid_node", "This node's role, name and release",
                               value={"role": state.role, "node": state.node, "version": self.product_version})
        yield GaugeMetricFamily("safesquid_node_ready", "1 when the node takes traffic (what /health says)",
                                value=1.0 if state.ready else 0.0)
        uptime = state.uptime_s
        if uptime is not None:
            yield GaugeMetricFamily("safesquid_node_uptime_seconds", "Seconds since the node started", value=uptime)


class PolicyCollector:
    """The policy in force and how applying new versions goes (see policy/applier.py)."""

    def __init__(self, state: Any, store: Any) -> None:
        self.state = state
        self.store = store

    def collect(self) -> Iterator[Metric]:
        version = self.state.policy_version
        yield GaugeMetricFamily("safesquid_policy_version", "Policy version in force (0: none yet)",
                                value=float(version or 0))
        applier = self.store.applier
        applies = CounterMetricFamily("safesquid_policy_applies", "Policy versions prepared off the reactor thread, "
                                      "by outcome", labels=["outcome"])
        applies.add_metric(["applied"], applier.jobs_done)
        applies.add_metric(["refused"], applier.jobs_failed)
        applies.add_metric(["superseded"], applier.jobs_superseded)
        yield applies
        if applier.last_duration is not None:
            yield GaugeMetricFamily("safesquid_policy_last_apply_seconds", "Wall time of the last policy apply "
                                    "(validate, compile, write, swap)", value=applier.last_duration)
            yield GaugeMetricFamily("safesquid_policy_last_apply_cpu_seconds", "CPU time the worker thread spent "
                                    "on the last policy apply", value=applier.last_work_cpu or 0.0)
        yield GaugeMetricFamily("safesquid_policy_apply_in_progress", "1 while a policy version is being prepared",
                                value=1.0 if applier.busy else 0.0)


class ProxyCollector:
    """The forward proxy: requests, latency, upstream failures, connections, bytes."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        factory = self.factory
        counters = factory.counters
        requests = CounterMetricFamily("safesquid_requests", "Finished proxy requests by policy action and status "
                                       "class (0xx: no answer was sent)", labels=["action", "status_class"])
        for (action, cls), count in sorted(counters.requests.items()):
            requests.add_metric([action, cls], count)
        yield requests
        yield HistogramMetricFamily(
            "safesquid_request_duration_seconds", "Time from the request head to the end of the answer",
            buckets=counters.cumulative_buckets(), sum_value=counters.duration_sum,
        )
        failures = CounterMetricFamily("safesquid_upstream_failures", "Failures reaching or reading origins by kind "
                                       "(the Proxy-Status error type; timeouts end in _timeout)", labels=["kind"])
        for kind, count in sorted(counters.upstream_failures.items()):
            failures.add_metric([kind], count)
        yield failures
        connections = factory.connections
        yield GaugeMetricFamily("safesquid_client_connections", "Open client connections", value=len(connections))
        yield GaugeMetricFamily("safesquid_tunnels", "Open CONNECT and WebSocket tunnels",
                                value=sum(1 for conn in connections if conn.tunnel is not None))
        traffic = CounterMetricFamily("safesquid_client_bytes", "Bytes exchanged with clients: in = received "
                                      "(bodies and tunnel bytes), out = sent", labels=["direction"])
        traffic.add_metric(["in"], counters.bytes_in)
        traffic.add_metric(["out"], counters.bytes_out)
        yield traffic


# Spool attributes shown when the spool has them: (attribute, metric name, help, counter?)
_SPOOL_FIELDS: tuple[tuple[str, str, str, bool], ...] = (
    ("backlog_records", "safesquid_spool_backlog_records", "Access records not yet shipped", False),
    ("backlog_bytes", "safesquid_spool_backlog_bytes", "Bytes of access records not yet shipped", False),
    ("dropped_records", "safesquid_spool_dropped_records", "Access records dropped (spool full or unwritable)", True),
    ("memory_backlog_records", "safesquid_spool_memory_backlog_records",
     "Access records held in memory while the state directory cannot be written", False),
    ("memory_backlog_bytes", "safesquid_spool_memory_backlog_bytes",
     "Bytes held in memory while the state directory cannot be written", False),
)


class SpoolCollector:
    """The access-record spool: backlog and drops. Reads the attributes it finds, so a spool that
    grows new counters (memory backlog, write errors) shows them by adding a line above."""

    def __init__(self, spool: Any) -> None:
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        spool = self.spool
        for attribute, name, help_text, is_counter in _SPOOL_FIELDS:
            value = getattr(spool, attribute, None)
            if value is None:
                continue
            family = CounterMetricFamily if is_counter else GaugeMetricFamily
            yield family(name, help_text, value=float(value))
        writable = getattr(spool, "writable", None)
        if writable is not None:
            yield GaugeMetricFamily("safesquid_spool_writable", "1 when the spool directory can be written",
                                    value=1.0 if writable else 0.0)


class MasterLinkCollector:
    """A slave's control-plane connection to its master."""

    def __init__(self, client: Any, now: Callable[[], float]) -> None:
        self.client = client
        self.now = now

    def collect(self) -> Iterator[Metric]:
        client = self.client
        connected = client.avatar is not None
        yield GaugeMetricFamily("safesquid_master_connected", "1 while this slave is logged in to its master",
                                value=1.0 if connected else 0.0)
        since = client.connected_since
        if connected and since is not None:
            yield GaugeMetricFamily("safesquid_master_connected_seconds", "Seconds the current master connection "
                                    "has lasted", value=max(0.0, self.now() - since))


class ClusterCollector:
    """A master's view of its slaves: connection, policy version and lag, push latency, ingest."""

    def __init__(self, plane: Any, registry: Any, store: Any) -> None:
        self.plane = plane
        self.registry = registry
        self.store = store

    def collect(self) -> Iterator[Metric]:
        current = self.store.current
        current_version = current.version if current is not None else 0
        connected = GaugeMetricFamily("safesquid_cluster_node_connected", "1 while the node is connected",
                                      labels=["node"])
        version = GaugeMetricFamily("safesquid_cluster_node_policy_version", "Policy version the node runs",
                                    labels=["node"])
        lag = GaugeMetricFamily("safesquid_cluster_node_policy_lag_versions", "Versions the node is behind the "
                                "master's current policy (sync lag)", labels=["node"])
        backlog = GaugeMetricFamily("safesquid_cluster_node_backlog_records", "Records the node has not shipped "
                                    "yet (its last status report)", labels=["node"])
        dropped = GaugeMetricFamily("safesquid_cluster_node_dropped_records", "Records the node reports dropped",
                                    labels=["node"])
        for name, rec in sorted(self.registry.records.items()):
            connected.add_metric([name], 1.0 if rec.connected else 0.0)
            node_version = rec.policy_version or 0
            version.add_metric([name], float(node_version))
            lag.add_metric([name], float(max(0, current_version - node_version)))
            backlog.add_metric([name], float(rec.backlog_records))
            dropped.add_metric([name], float(rec.dropped_records))
        yield from (connected, version, lag, backlog, dropped)
        latency = GaugeMetricFamily("safesquid_policy_push_latency_seconds", "Seconds from announcing the last "
                                    "version to the node's acknowledgement of it", labels=["node"])
        for name, seconds in sorted(self.plane.push_latency.items()):
            latency.add_metric([name], seconds)
        yield latency
        ingested = CounterMetricFamily("safesquid_ingested_records", "Access records stored from each node "
                                       "(rate() gives the ingest rate)", labels=["node"])
        for name, count in sorted(self.plane.ingested_records.items()):
            ingested.add_metric([name], count)
        yield ingested


class PortalCollector:
    """The portal: failed logins (throttled per account and address)."""

    def __init__(self, services: Any) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        throttle = self.services.throttle
        yield CounterMetricFamily("safesquid_portal_failed_logins", "Failed portal logins",
                                  value=getattr(throttle, "failed_total", 0))


class StatsCollector:
    """Any part that keeps its numbers in a `stats()` dict becomes metrics with one line:

        metrics.register(StatsCollector("icap", scanner, help={"scans_total": "Files scanned"}))

    Each numeric entry `key` becomes `safesquid_<prefix>_<key>`: a counter when the key ends in
    `_total`, a gauge otherwise (booleans are 0/1). A dict of numbers becomes one family with a
    `label` label (`label` names it: e.g. `{"clean": 5, "infected": 1}` with label="result").
    Non-numeric entries are skipped, so `stats()` can serve /health as well.
    """

    def __init__(self, prefix: str, source: Any, *, help: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None) -> None:
        self.prefix = prefix
        self.source = source
        self.help = help or {}
        self.labels = labels or {}

    def collect(self) -> Iterator[Metric]:
        for key, value in sorted(self.source.stats().items()):
            name = f"safesquid_{self.prefix}_{key}"
            text = self.help.get(key, f"{self.prefix} {key.replace('_', ' ')}")
            counter = key.endswith("_total")
            family_type = CounterMetricFamily if counter else GaugeMetricFamily
            family_name = name[: -len("_total")] if counter else name
            if isinstance(value, bool):
                yield family_type(family_name, text, value=1.0 if value else 0.0)
            elif isinstance(value, (int, float)):
                yield family_type(family_name, text, value=float(value))
            elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
                family = family_type(family_name, text, labels=[self.labels.get(key, "label")])
                for label, number in sorted(value.items()):
                    family.add_metric([str(label)], float(number))
                yield family


__all__ = [
    "StatsCollector",
    "ClusterCollector",
    "MasterLinkCollector",
    "NodeCollector",
    "PolicyCollector",
    "PortalCollector",
    "ProxyCollector",
    "SpoolCollector",
]
