"""The parts together on HTTPS: anti-virus (real c-icap + ClamAV) and directory users (real slapd)
inside inspected TLS tunnels, exactly as for plain HTTP, and the parts' figures in /metrics."""

from __future__ import annotations

import http.client
import urllib.request

import pytest

import harness
from directory_servers import GROUPS, Slapd
from icap_servers import EICAR, THREAT_NAME, Scanners, missing_tools
from tls_origins import OriginSet, https_via_proxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def origins():
    servers = OriginSet()
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def scanners(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(missing)
    servers = Scanners(tmp_path_factory.mktemp("scanners")).start()
    yield servers
    servers.stop()


def trusting_client(node) -> str:
    ca_pem = urllib.request.urlopen(f"http://{node.portal[0]}:{node.portal[1]}/inspection-ca.crt", timeout=5).read()
    path = node.state_dir / "client-trusts.pem"
    path.write_bytes(ca_pem)
    return str(path)


def metrics_text(node) -> str:
    conn = http.client.HTTPConnection(*node.portal, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def av_tls_node(module_node_factory, origins, scanners):
    policy = harness.make_policy(
        connect={"allowed_ports": [origins.good.port]},
        tls_inspection={"enabled": True},
        antivirus={"enabled": True, "icap_services": [scanners.url]},
    )
    node = module_node_factory.start(policy=policy, name="avtls", args=["--upstream-ca-file", str(origins.ca_file)])

    def scanner_ok():
        _status, health = node.health()
        services = ((health or {}).get("antivirus") or {}).get("services") or []
        return services and all(s["state"] == "ok" for s in services)

    harness.wait_until(scanner_ok, 20, "the node's ICAP service to pass its self-test")
    node.client_ca = trusting_client(node)
    return node


def test_an_infected_https_download_is_blocked_inside_the_tunnel(av_tls_node, origins):
    node = av_tls_node
    status, _headers, body, _der = https_via_proxy(node.proxy, "localhost", origins.good.port, "/eicar.com",
                                                  cafile=node.client_ca)
    assert status == 403 and THREAT_NAME.encode() in body
    record = node.wait_for_access(lambda r: r["url"].endswith("/eicar.com"))
    assert record["tls"] == "inspected" and record["action"] == "deny" and record["rule"] == "antivirus"
    assert THREAT_NAME in (record["detail"] or "")


def test_a_clean_https_download_passes_and_an_infected_upload_is_refused(av_tls_node, origins):
    node = av_tls_node
    status, _headers, _body, _der = https_via_proxy(node.proxy, "localhost", origins.good.port, "/clean",
                                                   cafile=node.client_ca)
    assert status == 200
    status, _headers, body, _der = https_via_proxy(
        node.proxy, "localhost", origins.good.port, "/upload", cafile=node.client_ca, method="POST", body=EICAR,
        headers={"Content-Type": "application/octet-stream"})
    assert status == 403 and THREAT_NAME.encode() in body


def test_metrics_show_the_scanner_and_the_inspection(av_tls_node, origins):
    https_via_proxy(av_tls_node.proxy, "localhost", origins.good.port, "/for-metrics", cafile=av_tls_node.client_ca)
    text = metrics_text(av_tls_node)
    assert "safesquid_antivirus_service_up{" in text and "} 1.0" in text
    assert "safesquid_antivirus_detections_total{" in text
    assert 'safesquid_tls_tunnels_total{outcome="bumped"}' in text
    assert "safesquid_edge_refused_total{" in text


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd")).start()
    yield server
    server.stop()


def test_a_directory_user_authenticated_on_connect_is_named_inside_the_tunnel(module_node_factory, origins, slapd):
    policy = harness.make_policy(
        rules=[{"name": "engineering-secrets", "action": "deny", "groups": ["engineering"],
                "url_patterns": ["https://localhost:*/secret/*"]}],
        connect={"allowed_ports": [origins.good.port]},
        tls_inspection={"enabled": True},
        authentication={"enabled": True, "directory": slapd.settings()},
        groups=[{"name": "engineering", "directory_groups": [f"cn=engineering,{GROUPS}"]}],
    )
    node = module_node_factory.start(policy=policy, name="dirtls", args=["--upstream-ca-file", str(origins.ca_file)])
    cafile = trusting_client(node)
    auth = {"Proxy-Authorization": harness.basic_credentials("alice", "alice-password")}
    import ssl

    ctx = ssl.create_default_context(cafile=cafile)
    for path, expected in (("/open", 200), ("/secret/plan", 403)):
        conn = http.client.HTTPSConnection(node.proxy[0], node.proxy[1], context=ctx, timeout=10)
        conn.set_tunnel("localhost", origins.good.port, headers=auth)
        try:
            conn.request("GET", path)
            assert conn.getresponse().status == expected, path
        finally:
            conn.close()
    record = node.wait_for_access(lambda r: r["url"].endswith("/open") and r["method"] == "GET")
    assert record["user"] == "alice" and record["groups"] == ["engineering"] and record["tls"] == "inspected"
