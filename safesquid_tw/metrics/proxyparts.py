"""Collectors for the proxy's optional parts: edge refusals, TLS inspection, anti-virus scanners.

Like `collectors.py`, each reads live plain attributes when Prometheus scrapes and keeps no state.
They are registered on proxy nodes only (slave/service.py); a part that is off yields nothing
or zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class EdgeCollector:
    """Connections the proxy closed at its edge (PROXY headers, per-client limit, first byte)."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("safesquid_edge_refused", "Client connections closed at the edge before any "
                                     "request, by reason", labels=["reason"])
        for reason, count in sorted(self.factory.edge_counters().items()):
            family.add_metric([reason], count)
        yield family


class TlsInspectionCollector:
    """Tunnels bumped and spliced, leaves minted and cached, clients that rejected the CA."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        interceptor = getattr(self.factory, "intercept", None)
        if interceptor is None:
            return
        tunnels = CounterMetricFamily("safesquid_tls_tunnels", "Allowed CONNECT tunnels by what inspection did "
                                      "(bumped: decrypted; spliced: carried unchanged)", labels=["outcome"])
        tunnels.add_metric(["bumped"], interceptor.bumped)
        tunnels.add_metric(["spliced"], interceptor.spliced)
        yield tunnels
        leaves = interceptor.leaves
        yield CounterMetricFamily("safesquid_tls_leaves_minted", "Leaf certificates minted for intercepted hosts",
                                  value=leaves.minted)
        yield GaugeMetricFamily("safesquid_tls_leaves_cached", "Leaf certificates (with their TLS contexts) cached",
                                value=len(leaves._cache))
        yield GaugeMetricFamily("safesquid_tls_ca_loaded", "1 when this node has an inspection CA",
                                value=1.0 if interceptor.ready else 0.0)
        pinned = interceptor.pinned.top(10000)
        yield GaugeMetricFamily("safesquid_tls_pinned_hosts", "Hosts whose clients rejected the inspection "
                                "certificate (pinned apps)", value=len(pinned))
        origin_tls = getattr(getattr(self.factory, "pool", None), "tls", None)
        if origin_tls is not None:
            handshakes = CounterMetricFamily("safesquid_tls_origin_handshakes", "TLS handshakes with origins for "
                                             "inspected traffic, by whether a kept session was resumed",
                                             labels=["session"])
            handshakes.add_metric(["resumed"], origin_tls.resumed)
            handshakes.add_metric(["full"], origin_tls.handshakes - origin_tls.resumed)
            yield handshakes


class AntivirusCollector:
    """Each ICAP service: state, scans, detections, failures, latency; the verdict cache."""

    STATES = ("starting", "ok", "down", "broken")

    def __init__(self, scanner: Any) -> None:
        self.scanner = scanner

    def collect(self) -> Iterator[Metric]:
        stats = self.scanner.stats()
        if not stats["enabled"]:
            return
        up = GaugeMetricFamily("safesquid_antivirus_service_up", "1 when the ICAP service answers and passed "
                               "its EICAR self-test", labels=["service"])
        state = GaugeMetricFamily("safesquid_antivirus_service_state", "The service's state (1 for the current "
                                  "one)", labels=["service", "state"])
        scans = CounterMetricFamily("safesquid_antivirus_scans", "Objects scanned", labels=["service"])
        detections = CounterMetricFamily("safesquid_antivirus_detections", "Threats found", labels=["service"])
        failures = CounterMetricFamily("safesquid_antivirus_failures", "Scans the service failed to answer",
                                       labels=["service"])
        latency = GaugeMetricFamily("safesquid_antivirus_latency_seconds", "Latency of the service's last answer",
                                    labels=["service"])
        for service in stats["services"]:
            url = service["url"]
            up.add_metric([url], 1.0 if service["state"] == "ok" else 0.0)
            for name in sorted({*self.STATES, service["state"]}):
                state.add_metric([url, name], 1.0 if service["state"] == name else 0.0)
            scans.add_metric([url], service["scans"])
            detections.add_metric([url], service["detections"])
            failures.add_metric([url], service["failures"])
            if service["latency_ms"] is not None:
                latency.add_metric([url], service["latency_ms"] / 1000.0)
        yield from (up, state, scans, detections, failures, latency)
        yield CounterMetricFamily("safesquid_antivirus_unscanned", "Objects let through unscanned (fail_mode "
                                  "open, oversize allow)", value=stats["unscanned"])
        yield CounterMetricFamily("safesquid_antivirus_cache_hits", "Objects whose clean verdict came from the "
                                  "cache", value=stats["cache_hits"])
        yield GaugeMetricFamily("safesquid_antivirus_cache_entries", "Clean verdicts remembered",
                                value=stats["cache_entries"])


__all__ = ["AntivirusCollector", "EdgeCollector", "TlsInspectionCollector"]
