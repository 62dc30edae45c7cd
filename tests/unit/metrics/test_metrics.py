"""The metrics module: collectors read live counters at scrape time, /metrics is guarded by the
portal allow list and the optional bearer token, plain HTTP reaches it beside /health."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from safesquid_tw.metrics import NodeMetrics
from safesquid_tw.metrics.collectors import PolicyCollector, ProxyCollector, SpoolCollector
from safesquid_tw.metrics.resource import MetricsResource, read_token_file
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.portal.allowlist import PortalAllowList
from safesquid_tw.portal.plainhealth import HealthOnlyRoot
from safesquid_tw.proxy.counters import ProxyCounters, status_class
from tests.unit.policy.test_store import doc as sample_doc

TOKEN = b"a-token-of-enough-length"


class FakeFactory:
    def __init__(self) -> None:
        self.counters = ProxyCounters()
        self.connections: set = set()


class FakeConn:
    def __init__(self, tunnel) -> None:
        self.tunnel = tunnel


def values(metrics: NodeMetrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_status_classes():
    assert [status_class(s) for s in (0, 101, 200, 304, 407, 502, 999)] == ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx",
                                                                           "other"]


def test_the_proxy_collector_reads_the_counters_at_scrape_time():
    metrics = NodeMetrics()
    factory = FakeFactory()
    metrics.register(ProxyCollector(factory))
    assert values(metrics)[("safesquid_request_duration_seconds_count", ())] == 0
    counters = factory.counters
    counters.count_request("allow", 200, 0.003, 10, 100)
    counters.count_request("allow", 204, 0.5, 0, 0)
    counters.count_request("deny", 403, 0.0001, 0, 50)
    counters.upstream_failed("connection_timeout")
    factory.connections |= {FakeConn(None), FakeConn(object())}
    v = values(metrics)
    assert v[("safesquid_requests_total", (("action", "allow"), ("status_class", "2xx")))] == 2
    assert v[("safesquid_requests_total", (("action", "deny"), ("status_class", "4xx")))] == 1
    assert v[("safesquid_request_duration_seconds_bucket", (("le", "0.001"),))] == 1
    assert v[("safesquid_request_duration_seconds_bucket", (("le", "0.005"),))] == 2
    assert v[("safesquid_request_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert v[("safesquid_request_duration_seconds_sum", ())] == pytest.approx(0.5031)
    assert v[("safesquid_upstream_failures_total", (("kind", "connection_timeout"),))] == 1
    assert v[("safesquid_client_connections", ())] == 2 and v[("safesquid_tunnels", ())] == 1
    assert v[("safesquid_client_bytes_total", (("direction", "out"),))] == 150


def test_the_spool_collector_shows_what_the_spool_has():
    class Spool:
        backlog_records = 5
        backlog_bytes = 500
        dropped_records = 2

    metrics = NodeMetrics()
    metrics.register(SpoolCollector(Spool()))
    v = values(metrics)
    assert v[("safesquid_spool_backlog_records", ())] == 5
    assert v[("safesquid_spool_dropped_records_total", ())] == 2
    assert ("safesquid_spool_memory_backlog_records", ()) not in v
    Spool.memory_backlog_records = 7
    Spool.writable = False
    v = values(metrics)
    assert v[("safesquid_spool_memory_backlog_records", ())] == 7 and v[("safesquid_spool_writable", ())] == 0


def test_the_policy_collector_follows_the_store(tmp_path):
    state = NodeState(role="standalone", node="n")
    store = PolicyStore(tmp_path)
    store.add_observer(lambda p: setattr(state, "policy_version", p.version))
    metrics = NodeMetrics()
    metrics.register(PolicyCollector(state, store))
    store.apply_document_async(sample_doc(), source="t")
    v = values(metrics)
    assert v[("safesquid_policy_version", ())] == 1
    assert v[("safesquid_policy_applies_total", (("outcome", "applied"),))] == 1
    assert ("safesquid_policy_last_apply_seconds", ()) in v


def _store_with_allow(tmp_path, networks):
    store = PolicyStore(tmp_path)
    store.apply_document(sample_doc() | {"access_restriction": {"portal_allow": networks}}, source="t")
    return store


def _get(resource, address="10.1.2.3", authorization=None, path=b"/metrics", method=b"GET"):
    request = DummyRequest([])
    request.method = method
    request.path = request.uri = path
    request.client = IPv4Address("TCP", address, 40000)
    if authorization is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization])
    body = resource.render(request)
    return request.responseCode or 200, request, body


def _resource(tmp_path, networks=(), token=None):
    metrics = NodeMetrics()
    state = NodeState(role="slave", node="n", policy_version=1)
    store = _store_with_allow(tmp_path, list(networks))
    return MetricsResource(metrics, PortalAllowList(store), state, token), metrics


def test_the_allow_list_guards_the_metrics(tmp_path):
    resource, _metrics = _resource(tmp_path, ["10.1.0.0/16"])
    assert _get(resource, "10.1.2.3")[0] == 200
    code, _request, _body = _get(resource, "192.0.2.9")
    assert code == 403 and resource.refused == 1


def test_the_bearer_token_is_required_when_configured(tmp_path):
    resource, _metrics = _resource(tmp_path, token=TOKEN)
    code, request, _ = _get(resource)
    assert code == 401 and request.responseHeaders.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer")
    assert _get(resource, authorization=b"Bearer wrong")[0] == 401
    assert _get(resource, authorization=b"Basic " + TOKEN)[0] == 401
    code, request, body = _get(resource, authorization=b"Bearer " + TOKEN)
    assert code == 200 and request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(
        b"text/plain; version=0.0.4")


def test_only_get_and_head(tmp_path):
    resource, _ = _resource(tmp_path)
    assert _get(resource, method=b"POST")[0] == 405


def test_plain_http_reaches_metrics_beside_health_when_mounted(tmp_path):
    resource, metrics = _resource(tmp_path)
    root = HealthOnlyRoot(NodeState(role="slave", node="n", policy_version=1))
    root.putChild(b"metrics", resource)
    request = DummyRequest([b"metrics"])
    assert root.getChildWithDefault(b"metrics", request) is resource


def test_token_files_must_hold_a_real_token(tmp_path):
    path = tmp_path / "token"
    path.write_text("short\n")
    with pytest.raises(ValueError):
        read_token_file(str(path))
    path.write_text("")
    with pytest.raises(ValueError):
        read_token_file(str(path))
    path.write_text(TOKEN.decode() + "\nignored\n")
    assert read_token_file(str(path)) == TOKEN


def test_a_stats_dict_becomes_metrics_with_one_line():
    from safesquid_tw.metrics.collectors import StatsCollector

    class Scanner:
        def stats(self):
            return {"scans_total": 5, "connected": True, "queue": 2, "results_total": {"clean": 4, "infected": 1},
                    "last_error": "timeout"}

    metrics = NodeMetrics()
    metrics.register(StatsCollector("icap", Scanner(), labels={"results_total": "result"}))
    v = values(metrics)
    assert v[("safesquid_icap_scans_total", ())] == 5
    assert v[("safesquid_icap_connected", ())] == 1 and v[("safesquid_icap_queue", ())] == 2
    assert v[("safesquid_icap_results_total", (("result", "infected"),))] == 1
    assert not any(name.startswith("safesquid_icap_last_error") for name, _ in v)
