"""HTTP at the margins, black-box over real sockets: refused CONNECTs close, tunnels keep
half-close, cut-short responses end cleanly and are recorded, userinfo is refused and never logged,
underscore field names are dropped, 1xx floods are bounded, tainted pooled connections are never
reused; and rules match the normal form of the URL (the bypass spellings, through the proxy)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import harness
from harness import RawConnection, build_request, echo_headers, proxy_request
from scripted_origin import OriginConn, ScriptedOrigin

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIB = 1 << 20


# -- scripted origins -------------------------------------------------------------------------

def answer_after_upload(conn: OriginConn) -> None:
    """A CONNECT peer: take everything until the client's end, then answer 1 MiB and close."""
    received = conn.read_until_eof()
    conn.send(b"%d\n" % received + b"a" * MIB)


def websocket_answer_after_upload(conn: OriginConn) -> None:
    if not conn.read_head():
        return
    conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    received = conn.read_until_eof()
    conn.send(b"got %d" % received)


class CutShort:
    """/length, /chunked: 40,000 of 100,000 body bytes, then a close; /reset: then a reset."""

    def __init__(self) -> None:
        self.client_has_head = threading.Event()

    def __call__(self, conn: OriginConn) -> None:
        head = conn.read_head()
        if not head:
            return
        path = head.split(b" ")[1]
        body = b"b" * 40_000
        if path.endswith(b"/chunked"):
            conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9c40\r\n" + body + b"\r\n")
        else:
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + body)
        if path.endswith(b"/reset"):
            self.client_has_head.wait(10)
            conn.reset()


def interim_flood(conn: OriginConn) -> None:
    if not conn.read_head():
        return
    burst = b"HTTP/1.1 100 Continue\r\n\r\n" * 2000
    deadline = time.monotonic() + 10
    sent = 0
    while sent < 256 * MIB and time.monotonic() < deadline and conn.send(burst):
        sent += len(burst)


class LateBytes:
    """HEAD /head: a head, then (when told) a whole response nobody asked for. GET /idle: an answer,
    then (when told) junk while the connection idles. GET anything else: "fresh"."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.tainted_closed = threading.Event()

    def __call__(self, conn: OriginConn) -> None:
        while True:
            head = conn.read_head()
            if not head:
                return
            method, path = head.split(b" ")[:2]
            if method == b"HEAD" or path.endswith(b"/idle"):
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n" + (b"" if method == b"HEAD" else b"first!"))
                self.go.wait(10)
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npoison")
                if conn.closed_by_peer(10):
                    self.tainted_closed.set()
                return
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")


@pytest.fixture(scope="module")
def scripted():
    servers = {
        "tunnel": ScriptedOrigin(answer_after_upload),
        "ws": ScriptedOrigin(websocket_answer_after_upload),
        "cut": ScriptedOrigin(CutShort()),
        "flood": ScriptedOrigin(interim_flood),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def closed_connect_port():
    return harness.closed_port()


@pytest.fixture(scope="module")
def node(module_node_factory, origins, scripted, closed_connect_port):
    echo = origins.authority("http")
    policy = harness.make_policy(
        rules=[
            {"name": "no-secret", "action": "deny", "url_patterns": [f"http://{echo}/secret/*"]},
            {"name": "no-admin-app", "action": "deny", "applications": ["admin-panel"]},
        ],
        applications=[{"name": "admin-panel", "hosts": ["127.0.0.1"], "paths": ["/admin/*"]}],
        content_security={"blocked_mime_types": [], "blocked_extensions": ["exe"],
                          "max_upload_bytes": None, "max_download_bytes": None},
        connect={"allowed_ports": [scripted["tunnel"].port, closed_connect_port]},
    )
    return module_node_factory.start(policy=policy, name="margins", args=["--read-timeout", "5"])


def read_to_end(conn: RawConnection, timeout: float = 20) -> tuple[bytes, str]:
    """Everything until the proxy closes: (bytes, "eof" or "reset")."""
    data = bytearray(conn.buffer)
    conn.buffer.clear()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = conn.sock.recv(MIB)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk
    raise AssertionError(f"the proxy did not close within {timeout} s ({len(data)} bytes)")


SMUGGLED = b"GET http://127.0.0.1:9/smuggled HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"


# -- refused or failed CONNECT ------------------------------------------------------------------

def test_refused_connect_closes_without_reading_what_followed(node, origins):
    authority = origins.authority("http")  # not an allowed CONNECT port
    with RawConnection(node.proxy) as conn:
        conn.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + SMUGGLED)
        data, ending = read_to_end(conn)
    assert data.startswith(b"HTTP/1.1 403 ") and data.count(b"HTTP/1.1 ") == 1, data[:200]
    assert ending == "eof"
    harness.wait_until(lambda: any(r["method"] == "CONNECT" and authority in r["url"] for r in node.access_records()),
                       5, "the refused CONNECT's record")
    assert not any("smuggled" in r["url"] for r in node.access_records())


def test_connect_to_a_refusing_origin_closes_without_reading_what_followed(node, closed_connect_port):
    authority = f"127.0.0.1:{closed_connect_port}"
    with RawConnection(node.proxy) as conn:
        conn.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + SMUGGLED)
        data, ending = read_to_end(conn)
    assert data.startswith(b"HTTP/1.1 502 ") and data.count(b"HTTP/1.1 ") == 1, data[:200]
    assert ending == "eof"
    assert not any("smuggled" in r["url"] for r in node.access_records())


# -- half-close in tunnels ------------------------------------------------------------------------

def test_connect_tunnel_upload_then_half_close_gets_the_whole_answer(node, scripted):
    authority = scripted["tunnel"].authority
    with RawConnection(node.proxy) as conn:
        conn.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, _ = conn.read_head()
        assert status == 200
        conn.send(b"u" * MIB)
        conn.sock.shutdown(socket.SHUT_WR)
        data, ending = read_to_end(conn)
    assert ending == "eof"
    assert data == b"%d\n" % MIB + b"a" * MIB, (len(data), data[:40])


def test_websocket_upload_then_half_close_gets_the_answer(node, scripted):
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("GET", scripted["ws"].url("/ws"), headers=[
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]))
        status, _ = conn.read_head()
        assert status == 101
        conn.send(b"w" * 300_000)
        conn.sock.shutdown(socket.SHUT_WR)
        data, ending = read_to_end(conn)
    assert data == b"got 300000" and ending == "eof"


# -- responses cut short by the origin -------------------------------------------------------------

@pytest.mark.parametrize("path", ["/length", "/chunked", "/reset"])
def test_cut_short_response_reaches_the_client_and_is_recorded(node, scripted, path):
    cut = scripted["cut"]
    cut.handler.client_has_head.clear()
    url = cut.url(path)
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("GET", url))
        status, headers = conn.read_head()
        cut.handler.client_has_head.set()
        body, ending = read_to_end(conn)
    assert status == 200
    assert ending == "eof", "the client got a reset instead of a clean close"
    if path == "/chunked":
        assert ("Transfer-Encoding", "chunked") in headers and not body.endswith(b"0\r\n\r\n")
        assert body.count(b"b") == 40_000
    elif path == "/length":
        assert body == b"b" * 40_000
    else:
        assert len(body) <= 40_000 and set(body) <= {ord("b")}
    record = node.wait_for_url(url)
    assert record["transfer"] == "origin_incomplete", record
    assert record["status"] == 200


def test_a_complete_response_is_recorded_complete(node, origins):
    url = origins.url("/complete-transfer")
    assert proxy_request(node, "GET", url).status == 200
    assert node.wait_for_url(url)["transfer"] == "complete"


# -- userinfo, underscores -----------------------------------------------------------------------

def test_userinfo_is_400_and_never_logged(node, origins):
    secret = "pw-8b-s3cr3t"
    for raw in (
        f"GET http://alice:{secret}@{origins.authority()}/x HTTP/1.1\r\nHost: {origins.authority()}\r\n\r\n",
        f"CONNECT alice:{secret}@{origins.authority()} HTTP/1.1\r\nHost: {origins.authority()}\r\n\r\n",
    ):
        response = harness.raw_request(node.proxy, raw.encode())
        assert response.status == 400 and response.closed
        assert secret.encode() not in response.body
    assert proxy_request(node, "GET", origins.url("/after-userinfo")).status == 200
    node.wait_for_url("/after-userinfo")  # everything before it has been written too
    for path in node.state_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the password reached {path}"


def test_field_names_with_underscores_never_reach_the_origin(node, origins):
    response = proxy_request(node, "GET", origins.url("/underscore"), headers=[
        ("X_Forwarded_For", "6.6.6.6"), ("Remote_User", "admin"), ("X-Plain", "kept")])
    echo = harness.assert_passed(response)
    assert echo_headers(echo, "x-plain") == ["kept"]
    assert not echo_headers(echo, "x_forwarded_for") and not echo_headers(echo, "remote_user")
    assert "6.6.6.6" not in str(echo["headers"])


# -- 1xx flood -----------------------------------------------------------------------------------

def test_interim_flood_is_502_and_memory_stays_flat(node, scripted, origins):
    before = node.rss_bytes()
    with RawConnection(node.proxy) as conn:
        conn.send(build_request("GET", scripted["flood"].url("/flood")))
        interim = 0
        while True:
            status, _ = conn.read_head(timeout=20)
            if status >= 200:
                break
            interim += 1
        _data, ending = read_to_end(conn)
    assert (interim, status) == (10, 502) and ending == "eof"
    after = node.rss_bytes()
    print(f"node RSS before the 1xx flood {before / MIB:.1f} MiB, after {after / MIB:.1f} MiB")
    assert after - before < 40 * MIB, f"RSS grew from {before >> 20} to {after >> 20} MiB"
    harness.assert_passed(proxy_request(node, "GET", origins.url("/still-served")))


# -- pooled connections that speak out of turn --------------------------------------------------

@pytest.mark.parametrize("method, path", [("HEAD", "/head"), ("GET", "/idle")])
def test_late_bytes_from_a_pooled_connection_never_reach_another_client(node, method, path):
    script = LateBytes()
    origin = ScriptedOrigin(script)
    try:
        first = proxy_request(node, method, origin.url(path))
        assert first.status == 200
        script.go.set()  # now the origin speaks out of turn
        assert script.tainted_closed.wait(10), "the proxy kept the tainted connection open"
        second = proxy_request(node, "GET", origin.url("/next"))
        assert second.status == 200 and second.body == b"fresh"
        assert origin.connections == 2
    finally:
        origin.stop()


# -- rules match the normal form (a representative subset, through the proxy) ---------------------

@pytest.mark.parametrize("path, rule", [
    ("/%73ecret/x", "no-secret"), ("/a/../secret/x", "no-secret"), ("/secret%2Fx", "no-secret"),
    ("//secret//x", "no-secret"), ("/a/..;/secret/x", "no-secret"), ("/a/%2e%2e/secret/x", "no-secret"),
    ("/files/setup.exe%3f", "content-security"), ("/files/setup.%65xe", "content-security"),
    ("/files/setup.exe;v=1", "content-security"),
    ("/%61dmin/panel", "no-admin-app"), ("/x/../admin/panel", "no-admin-app"),
])
def test_bypass_spellings_are_blocked_through_the_proxy(node, origins, path, rule):
    url = f"http://{origins.authority()}{path}"
    harness.assert_blocked(harness.raw_request(node.proxy, build_request("GET", url), close_wait=0), rule)


def test_the_origin_gets_the_clients_spelling_unless_it_had_dot_segments(node, origins):
    echo = harness.assert_passed(proxy_request(node, "GET", origins.url("/%7Euser/a%2Fb?q=%41")))
    assert echo["target"] == "/%7Euser/a%2Fb?q=%41"
    echo = harness.assert_passed(proxy_request(node, "GET", origins.url("/public/../other/%2e/x?q=/../y")))
    assert echo["target"] == "/other/x?q=/../y"
    record = node.wait_for_url("/other/x")
    assert record["action"] == "allow"
