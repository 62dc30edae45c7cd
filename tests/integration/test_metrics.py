"""GET /metrics on a real standalone node: Prometheus text that promtool accepts, values that move
with traffic, the portal allow list and the bearer token, and a policy reload (SIGHUP) applied
off the reactor thread showing in the policy metrics."""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

import harness
from cluster_harness import cluster, fetch  # noqa: F401 - fixture
from harness import proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TOKEN = "metrics-token-0123456789abcdef"


def _policy(allow: list[str], marker: str = "one") -> dict:
    return harness.make_policy(
        rules=[{"name": f"block-{marker}", "action": "deny", "domains": ["blocked.invalid"]}],
        access_restriction={"portal_allow": allow},
    )


@pytest.fixture(scope="module")
def node(module_node_factory, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("metrics-token") / "token"
    token_file.write_text(TOKEN + "\n")
    return module_node_factory.start(policy=_policy(["127.0.0.0/8"]), name="metrics",
                                     args=["--metrics-token-file", str(token_file)])


def promtool_check(body: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed: scripts/test installs it"
    check = subprocess.run([promtool, "check", "metrics"], input=body.encode(), capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def scrape(node, token: str | None = TOKEN) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection(*node.portal, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_promtool_accepts_the_metrics_of_a_real_node(node, origins):
    assert proxy_request(node, "GET", origins.url("/metrics/warm")).status == 200
    status, headers, body = scrape(node)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    promtool_check(body)
    for name in ("safesquid_requests_total", "safesquid_request_duration_seconds_bucket",
                 "safesquid_client_connections", "safesquid_tunnels", "safesquid_client_bytes_total",
                 "safesquid_policy_version", "safesquid_spool_backlog_records", "safesquid_spool_backlog_bytes",
                 "safesquid_spool_dropped_records_total", "safesquid_portal_failed_logins_total",
                 "safesquid_node_ready"):
        assert f"\n{name}" in body, f"{name} missing"


def test_values_move_with_requests(node, origins):
    _s, _h, before = scrape(node)
    for i in range(3):
        assert proxy_request(node, "GET", origins.url(f"/metrics/allowed/{i}")).status == 200
    assert proxy_request(node, "GET", "http://blocked.invalid/metrics").status == 403
    with socket.socket() as s:  # a port nobody listens on: the origin refuses the connection
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert proxy_request(node, "GET", f"http://127.0.0.1:{closed_port}/refused").status == 502
    # With workers each record reaches the node's counters over a pipe, a moment after its answer.
    harness.wait_until(lambda: value(scrape(node)[2], "safesquid_request_duration_seconds_count") -
                       value(before, "safesquid_request_duration_seconds_count") >= 5, 10, "five requests counted")
    _s, _h, after = scrape(node)
    assert value(after, "safesquid_requests_total", action="allow", status_class="2xx") - \
        value(before, "safesquid_requests_total", action="allow", status_class="2xx") == 3
    assert value(after, "safesquid_requests_total", action="deny", status_class="4xx") - \
        value(before, "safesquid_requests_total", action="deny", status_class="4xx") == 1
    assert value(after, "safesquid_request_duration_seconds_count") - \
        value(before, "safesquid_request_duration_seconds_count") == 5
    assert value(after, "safesquid_upstream_failures_total", kind="connection_refused") - \
        value(before, "safesquid_upstream_failures_total", kind="connection_refused") == 1
    assert value(after, "safesquid_client_bytes_total", direction="out") > \
        value(before, "safesquid_client_bytes_total", direction="out")


def test_the_token_is_required_and_checked(node):
    status, headers, _body = scrape(node, token=None)
    assert status == 401 and "bearer" in headers.get("www-authenticate", "").lower()
    assert scrape(node, token="wrong-token-wrong-token")[0] == 401
    assert scrape(node)[0] == 200


def test_addresses_outside_portal_allow_are_refused_and_a_reload_shows_in_the_policy_metrics(node):
    _s, _h, before = scrape(node)
    version = value(before, "safesquid_policy_version")
    node.reload(_policy(["10.99.0.0/16"], marker="two"))
    harness.wait_until(lambda: scrape(node)[0] == 403, 20, "GET /metrics refused after the allow list changed")
    assert node.health()[1]["policy_version"] == version + 1
    node.reload(_policy(["127.0.0.0/8"], marker="three"))
    harness.wait_until(lambda: scrape(node)[0] == 200, 20, "GET /metrics allowed again")
    _s, _h, after = scrape(node)
    assert value(after, "safesquid_policy_version") == version + 2
    assert value(after, "safesquid_policy_applies_total", outcome="applied") - \
        value(before, "safesquid_policy_applies_total", outcome="applied") == 2
    assert value(after, "safesquid_policy_last_apply_seconds") > 0


def test_master_and_slave_metrics(cluster, origins):
    """The master shows each slave's connection, policy version, sync lag and push latency;
    the slave shows its master connection; promtool accepts both."""
    cluster.start_master(harness.make_policy(rules=[{"name": "r1", "action": "deny", "domains": ["a.invalid"]}]))
    slave = cluster.add_slave()
    cluster.wait_view(slave.name, lambda e: e["policy_version"] == 1 and e["connected"], 10, "slave on version 1")
    assert fetch(slave, origins.url("/metrics/through-slave")).status == 200
    cluster.push(harness.make_policy(rules=[{"name": "r2", "action": "deny", "domains": ["b.invalid"]}]))
    cluster.wait_view(slave.name, lambda e: e["policy_version"] == 2, 15, "slave on version 2")

    def master_text() -> str:
        return scrape(cluster.master, token=None)[2]

    harness.wait_until(lambda: value(master_text(), "safesquid_policy_push_latency_seconds", node=slave.name) > 0,
                       10, "the push latency of the slave")
    text = master_text()
    promtool_check(text)
    assert value(text, "safesquid_cluster_node_connected", node=slave.name) == 1
    assert value(text, "safesquid_cluster_node_policy_version", node=slave.name) == 2
    assert value(text, "safesquid_cluster_node_policy_lag_versions", node=slave.name) == 0
    assert value(text, "safesquid_policy_version") == 2
    assert 'safesquid_node_info{node="master",role="master"' in text

    status, _headers, slave_text = scrape(slave, token=None)
    assert status == 200
    promtool_check(slave_text)
    assert value(slave_text, "safesquid_master_connected") == 1
    assert value(slave_text, "safesquid_policy_version") == 2
    assert value(slave_text, "safesquid_requests_total", action="allow", status_class="2xx") >= 1
