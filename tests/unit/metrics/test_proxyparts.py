"""The TLS inspection metrics: tunnels bumped and spliced, and origin handshakes by whether a
kept session was resumed (is resumption hitting?)."""

from __future__ import annotations

from types import SimpleNamespace

from safesquid_tw.config import Limits
from safesquid_tw.metrics import NodeMetrics
from safesquid_tw.metrics.proxyparts import TlsInspectionCollector
from safesquid_tw.proxy.intercept.mint import LeafCache
from safesquid_tw.proxy.intercept.session import Interceptor
from safesquid_tw.proxy.intercept.upstream_tls import UpstreamTLS
from tests.unit.metrics.test_metrics import values


def test_origin_handshakes_are_counted_full_and_resumed():
    origin_tls = UpstreamTLS()
    factory = SimpleNamespace(intercept=Interceptor(None, LeafCache(None, None), Limits()),
                              pool=SimpleNamespace(tls=origin_tls))
    metrics = NodeMetrics()
    metrics.register(TlsInspectionCollector(factory))
    origin_tls.handshakes, origin_tls.resumed = 5, 3
    factory.intercept.bumped = 7
    v = values(metrics)
    assert v[("safesquid_tls_origin_handshakes_total", (("session", "resumed"),))] == 3
    assert v[("safesquid_tls_origin_handshakes_total", (("session", "full"),))] == 2
    assert v[("safesquid_tls_tunnels_total", (("outcome", "bumped"),))] == 7


def test_no_origin_tls_no_origin_handshake_metric():
    factory = SimpleNamespace(intercept=Interceptor(None, LeafCache(None, None), Limits()), pool=SimpleNamespace(tls=None))
    metrics = NodeMetrics()
    metrics.register(TlsInspectionCollector(factory))
    assert not any(name == "safesquid_tls_origin_handshakes_total" for name, _ in values(metrics))
