"""CONNECT tunnels and Upgrade (WebSocket) tunnels through the proxy."""

from __future__ import annotations

import base64
import os
import time

import pytest

import harness
from harness import RawConnection, build_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TUNNEL_IDLE = 2.0


@pytest.fixture(scope="module")
def node(module_node_factory, origins):
    policy = harness.make_policy(connect={"allowed_ports": [origins.ports["tls"], origins.ports["ws"]]})
    return module_node_factory.start(policy=policy, args=["--tunnel-idle-timeout", str(TUNNEL_IDLE)],
                                     name="tunnels")


def open_tunnel(node, authority: str) -> RawConnection:
    conn = RawConnection(node.proxy)
    conn.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    status, headers = conn.read_head(timeout=10)
    assert status == 200, (status, headers)
    assert not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers)
    return conn


def upgrade_request(url: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return build_request("GET", url, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                              ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")])


def echo_round_trip(conn: RawConnection, payload: bytes) -> None:
    conn.send(payload)
    received = b""
    deadline = time.monotonic() + 5
    while len(received) < len(payload) and time.monotonic() < deadline:
        data = conn.read_some(timeout=5)
        assert data, "tunnel closed while waiting for the echo"
        received += data
    assert received == payload


# -- CONNECT ------------------------------------------------------------------------------------


def test_curl_through_connect_tunnel(node, origins):
    result = harness.curl("-x", node.proxy_url, "--proxytunnel", "-k", origins.url("/through/tunnel", name="tls"))
    assert result.returncode == 0, result.stderr
    assert result.status == 200
    echo = result.json()
    assert echo["origin"] == "tls" and echo["target"] == "/through/tunnel"


def test_connect_tunnel_is_logged_with_byte_counts(node, origins):
    result = harness.curl("-x", node.proxy_url, "--proxytunnel", "-k", origins.url("/logged/tunnel", name="tls"))
    assert result.status == 200, result.stderr
    authority = origins.authority("tls")
    record = node.wait_for_access(lambda r: r.get("method") == "CONNECT" and authority in str(r.get("url")),
                                  what=f"a CONNECT record for {authority}")
    assert record["status"] == 200
    assert record["bytes_in"] > 0 and record["bytes_out"] > 0, record


def test_connect_to_a_port_not_allowed_is_forbidden(node, origins):
    authority = origins.authority("http")
    response = harness.raw_request(node.proxy, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert response.status == 403
    assert "html" in (response.header("content-type") or "")
    node.wait_for_access(lambda r: r.get("method") == "CONNECT" and r.get("status") == 403
                         and authority in str(r.get("url")), what="the refused CONNECT in the access log")


def test_connect_to_port_443_default_is_not_in_this_policy(node):
    # allowed_ports replaces the default [443]; the proxy must refuse before connecting anywhere.
    response = harness.raw_request(node.proxy, b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n")
    assert response.status == 403


def test_idle_connect_tunnel_is_closed(node, origins):
    with open_tunnel(node, origins.authority("tls")) as conn:
        elapsed = conn.wait_closed(TUNNEL_IDLE + 8)
    assert elapsed is not None, "an idle tunnel stayed open"
    assert elapsed >= TUNNEL_IDLE * 0.7


def test_busy_tunnel_outlives_the_idle_timeout(node, origins):
    with open_tunnel(node, origins.authority("ws")) as conn:
        conn.send(upgrade_request("/ws-in-tunnel"))
        status, _ = conn.read_head(timeout=5)
        assert status == 101
        started = time.monotonic()
        while time.monotonic() - started < TUNNEL_IDLE * 2:
            echo_round_trip(conn, b"ping")
            time.sleep(TUNNEL_IDLE / 4)
        elapsed = conn.wait_closed(TUNNEL_IDLE + 8)
    assert elapsed is not None, "the tunnel never timed out once idle"


# -- Upgrade ------------------------------------------------------------------------------------


def test_websocket_upgrade_is_relayed(node, origins):
    with RawConnection(node.proxy) as conn:
        conn.send(upgrade_request(origins.url("/chat", name="ws")))
        status, headers = conn.read_head(timeout=5)
        assert status == 101
        names = {n.lower(): v for n, v in headers}
        assert names.get("upgrade", "").lower() == "websocket"
        assert "upgrade" in names.get("connection", "").lower()
        echo_round_trip(conn, b"hello over websocket")
        echo_round_trip(conn, bytes(range(256)) * 64)
    record = node.wait_for_url("/chat")
    assert record["status"] == 101


def test_idle_websocket_is_closed(node, origins):
    with RawConnection(node.proxy) as conn:
        conn.send(upgrade_request(origins.url("/idle-chat", name="ws")))
        status, _ = conn.read_head(timeout=5)
        assert status == 101
        echo_round_trip(conn, b"x")
        elapsed = conn.wait_closed(TUNNEL_IDLE + 8)
    assert elapsed is not None, "an idle Upgrade tunnel stayed open"
