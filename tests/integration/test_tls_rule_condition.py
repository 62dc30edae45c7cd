"""Access rules matching on how a request came (`tls`: inspected, bypassed, plain), end to end: a
real node denies uninspected (spliced) tunnels to a category while inspected requests to the same
sites go through, also when only the ClientHello of a CONNECT to an IP address names the site."""

from __future__ import annotations

import json
import ssl
import urllib.request

import pytest

import harness
from tls_origins import OriginSet, connect_tunnel, https_via_proxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

RULE = {"name": "no-blind-banking", "action": "deny", "reason": "banking is inspected or refused",
        "categories": ["banking"], "tls": ["bypassed"]}


@pytest.fixture(scope="module")
def origins():
    servers = OriginSet()
    yield servers
    servers.stop()


def _policy(origins: OriginSet, **tls) -> dict:
    return harness.make_policy(
        rules=[RULE, {"name": "no-plain-downloads", "action": "deny", "tls": ["plain"],
                      "url_patterns": ["*/plain-only/*"]}],
        categories={"banking": {"domains": ["localhost"]}},
        connect={"allowed_ports": sorted({o.port for o in origins.all()})},
        tls_inspection={"enabled": True, **tls},
    )


@pytest.fixture(scope="module")
def node(module_node_factory, origins):
    node = module_node_factory.start(policy=_policy(origins), name="tlsrule",
                                     args=["--upstream-ca-file", str(origins.ca_file)])
    ca_pem = urllib.request.urlopen(f"http://{node.portal[0]}:{node.portal[1]}/inspection-ca.crt", timeout=5).read()
    node.ca_file = node.state_dir / "client-trusts.pem"
    node.ca_file.write_bytes(ca_pem)
    return node


def _connect_status(node, authority: str) -> bytes:
    import socket

    with socket.create_connection(node.proxy, timeout=10) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return head.split(b"\r\n", 1)[0]


def test_inspected_requests_to_the_category_are_allowed(node, origins):
    port = origins.good.port
    status, _headers, body, _der = https_via_proxy(node.proxy, "localhost", port, "/inspected",
                                                   cafile=str(node.ca_file))
    assert status == 200 and json.loads(body)["path"] == "/inspected"
    record = node.wait_for_access(lambda r: r["url"] == f"https://localhost:{port}/inspected")
    assert record["tls"] == "inspected" and record["action"] == "allow" and record["category"] == "banking"
    connect = node.wait_for_access(lambda r: r["method"] == "CONNECT" and r["url"] == f"localhost:{port}")
    assert connect["action"] == "allow" and connect["tls"] == "inspected"


def test_a_bypassed_tunnel_to_the_category_is_denied(node, origins):
    port = origins.good.port
    try:
        node.reload(_policy(origins, bypass_domains=["localhost"]))
        harness.wait_until(lambda: _connect_status(node, f"localhost:{port}").startswith(b"HTTP/1.1 403"), 10,
                           "the bypassed tunnel to be refused")
        record = node.wait_for_access(lambda r: r["method"] == "CONNECT" and r["url"] == f"localhost:{port}"
                                      and r["action"] == "deny")
        assert record["rule"] == "no-blind-banking" and record["status"] == 403
        # A tunnel named by an address outside the category is still answered (and peeked).
        harness.wait_until(lambda: _connect_status(node, f"127.0.0.1:{port}").startswith(b"HTTP/1.1 200"), 10,
                           "other tunnels to stay open")
    finally:
        node.reload(_policy(origins))
        harness.wait_until(lambda: _connect_status(node, f"localhost:{port}").startswith(b"HTTP/1.1 200"), 10,
                           "inspection to resume")


def test_a_connect_to_an_ip_whose_sni_is_bypassed_is_closed_after_the_peek(node, origins):
    port = origins.good.port
    try:
        node.reload(_policy(origins, bypass_domains=["localhost"]))
        harness.wait_until(lambda: _connect_status(node, f"localhost:{port}").startswith(b"HTTP/1.1 403"), 10,
                           "the new policy to apply")
        sock = connect_tunnel(node.proxy, f"127.0.0.1:{port}")  # the address alone: allowed
        ctx = ssl.create_default_context(cafile=str(origins.ca_file))
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(sock, server_hostname="localhost").sendall(b"GET / HTTP/1.1\r\n\r\n")
        sock.close()
        record = node.wait_for_access(lambda r: r["method"] == "CONNECT" and r["url"] == f"127.0.0.1:{port}"
                                      and r["action"] == "deny")
        assert record["rule"] == "no-blind-banking" and record["tls"] == "bypassed"
        assert "localhost" in record["detail"]
    finally:
        node.reload(_policy(origins))
        harness.wait_until(lambda: _connect_status(node, f"localhost:{port}").startswith(b"HTTP/1.1 200"), 10,
                           "inspection to resume")


def test_plain_rules_do_not_match_inspected_requests(node, origins):
    port = origins.good.port
    status, _headers, _body, _der = https_via_proxy(node.proxy, "localhost", port, "/plain-only/x",
                                                    cafile=str(node.ca_file))
    assert status == 200  # `tls: [plain]` matches plain HTTP only
