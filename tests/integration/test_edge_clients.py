"""The client's own address at the proxy's edge, over real sockets: PROXY protocol listeners,
--proxy-protocol-from, several --listen, X-Forwarded-For (policy section `forwarding`), the
per-client connection limit and the first-byte deadline.

Clients bind their own loopback source (127.0.0.x) so each one is a different address.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

import harness
from harness import RawConnection, build_request, echo_headers, make_policy

pytestmark = pytest.mark.timeout(120)

HOST = harness.NODE_HOST
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
DENY_NINE = {"name": "no-nine", "action": "deny", "reason": "client nine is blocked", "clients": ["192.0.2.9/32"]}


def listening(node: harness.Node) -> dict[str, tuple[str, int]]:
    found = json.loads((node.state_dir / "run" / "listening.json").read_text())
    return {name: harness._parse_hostport(value) for name, value in found.items()}


def connect_from(source: str, addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(addr, timeout=timeout, source_address=(source, 0))


def raw_from(source: str, addr: tuple[str, int], data: bytes, timeout: float = 10.0):
    conn = RawConnection.__new__(RawConnection)
    conn.addr, conn.timeout, conn.buffer, conn.eof = addr, timeout, bytearray(), False
    conn.sock = connect_from(source, addr, timeout)
    with conn:
        conn.send(data)
        return conn.read_response(timeout=timeout, close_wait=0.0)


def v1(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.2 {port} 3128\r\n".encode()


def v2(source: str, port: int = 40000, command: int = 1) -> bytes:
    body = socket.inet_aton(source) + socket.inet_aton("127.0.0.2") + struct.pack("!HH", port, 3128)
    if command == 0:
        body = b""
    return SIG + bytes([0x20 | command, 0x11 if command else 0]) + struct.pack("!H", len(body)) + body


def closed_unanswered(sock: socket.socket, timeout: float = 10.0) -> bool:
    """The peer closed the connection without sending a byte."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def closed_at_once(source: str, addr: tuple[str, int], data: bytes = b"") -> bool:
    """Connect (and send `data`): the peer closes without an answer. A reset may come so soon
    that connect() or send() already reports it."""
    try:
        sock = connect_from(source, addr)
    except ConnectionResetError:
        return True
    with sock:
        try:
            if data:
                sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return True
        return closed_unanswered(sock)


@pytest.fixture(scope="module")
def proxied(module_node_factory, origins):
    """A node with a plain listener and a PROXY listener that admits headers from 127.0.0.10 only."""
    node = module_node_factory.start(
        policy=make_policy([DENY_NINE]),
        args=["--listen", f"haproxy:tcp:0:interface={HOST}", "--proxy-protocol-from", "127.0.0.10/32"],
        name="proxied",
    )
    return node, listening(node)["proxy_2"]


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_the_proxy_header_address_is_the_client(proxied, origins, header):
    node, proxy_listener = proxied
    url = origins.url(f"/edge/{header.__name__}/allowed")
    response = raw_from("127.0.0.10", proxy_listener, header("192.0.2.44") + build_request("GET", url))
    echo = harness.assert_passed(response)
    assert echo_headers(echo, "x-forwarded-for") == ["192.0.2.44"]
    assert node.wait_for_url(f"/edge/{header.__name__}/allowed")["client"] == "192.0.2.44"

    blocked = origins.url(f"/edge/{header.__name__}/blocked")
    response = raw_from("127.0.0.10", proxy_listener, header("192.0.2.9") + build_request("GET", blocked))
    harness.assert_blocked(response, "no-nine", "client nine is blocked")
    record = node.wait_for_url(f"/edge/{header.__name__}/blocked")
    assert record["client"] == "192.0.2.9" and record["action"] == "deny"


def test_local_is_served_as_the_balancers_own_address(proxied, origins):
    node, proxy_listener = proxied
    response = raw_from("127.0.0.10", proxy_listener, v2("0.0.0.0", command=0)
                        + build_request("GET", origins.url("/edge/local")))
    harness.assert_passed(response)
    assert node.wait_for_url("/edge/local")["client"] == "127.0.0.10"


@pytest.mark.parametrize("first_bytes", [
    b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a client straight to the listener
    b"PROXY TCP4 not-an-address 127.0.0.2 1 2\r\nGET / HTTP/1.1\r\n\r\n",
], ids=["no-header", "malformed"])
def test_a_missing_or_malformed_header_is_closed_unanswered_and_counted(proxied, first_bytes):
    node, proxy_listener = proxied
    before = node.health()[1]["edge"]["proxy_header_invalid"]
    mark = node.extended_mark()
    with connect_from("127.0.0.10", proxy_listener) as sock:
        sock.sendall(first_bytes)
        assert closed_unanswered(sock)
    harness.wait_until(lambda: node.health()[1]["edge"]["proxy_header_invalid"] > before, 5, "the counter")
    # One line per reason per 10 s: the first test's line may be the only one.
    if before == 0:
        node.wait_for_extended(lambda line: "PROXY listener" in line and "127.0.0.10" in line, since=mark)


def test_peers_outside_proxy_protocol_from_are_closed(proxied, origins):
    node, proxy_listener = proxied
    assert closed_at_once("127.0.0.11", proxy_listener,
                          v1("192.0.2.44") + build_request("GET", origins.url("/edge/outsider")))
    # Workers report their counts to the node about once a second.
    harness.wait_until(lambda: node.health()[1]["edge"]["proxy_peer_refused"] >= 1, 5, "the counter")
    assert not [r for r in node.access_records() if "/edge/outsider" in r["url"]]


def test_the_plain_listener_beside_it_serves_direct_clients(proxied, origins):
    node, _proxy_listener = proxied
    response = raw_from("127.0.0.12", node.proxy, build_request("GET", origins.url("/edge/direct")))
    harness.assert_passed(response)
    assert node.wait_for_url("/edge/direct")["client"] == "127.0.0.12"


def test_a_second_listener_that_cannot_bind_stops_the_node_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = harness.run_twistd(
            ["--listen", f"tcp:0:interface={HOST}", "--listen", f"haproxy:tcp:{port}:interface={HOST}",
             "--portal", f"tcp:0:interface={HOST}", "--state-dir", str(tmp_path / "state"), "--stop-grace", "0"],
            cwd=tmp_path, timeout=60,
        )
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if "cannot listen" in line]
    assert len(lines) == 1 and str(port) in lines[0] and "Address already in use" in lines[0], result.stdout


# -- X-Forwarded-For -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, expected_xff, forwarded_kept", [
    ("append", ["6.6.6.6, 127.0.0.13"], True),
    ("replace", ["127.0.0.13"], True),
    ("delete", [], False),
    ("transparent", ["6.6.6.6"], True),
])
def test_x_forwarded_for_modes(node_factory, origins, mode, expected_xff, forwarded_kept):
    node = node_factory.start(policy=make_policy(forwarding={"x_forwarded_for": mode}))
    request = build_request("GET", origins.url(f"/xff/{mode}"),
                            [("X-Forwarded-For", "6.6.6.6"), ("Forwarded", "for=6.6.6.6")])
    echo = harness.assert_passed(raw_from("127.0.0.13", node.proxy, request))
    assert echo_headers(echo, "x-forwarded-for") == expected_xff
    assert bool(echo_headers(echo, "forwarded")) is forwarded_kept
    # Whatever goes upstream, a client's own X-Forwarded-For never makes it someone else.
    assert node.wait_for_url(f"/xff/{mode}")["client"] == "127.0.0.13"


def test_a_trusted_downstream_proxys_client_is_the_client(node_factory, origins):
    policy = make_policy([{"name": "no-seven", "action": "deny", "clients": ["192.0.2.7/32"]}],
                         forwarding={"trusted_downstream": ["127.0.0.14/32"]})
    node = node_factory.start(policy=policy)
    forged = [("X-Forwarded-For", "6.6.6.6, 192.0.2.7")]
    # From the trusted downstream proxy: the right-most untrusted address is the client.
    response = raw_from("127.0.0.14", node.proxy, build_request("GET", origins.url("/trusted/seven"), forged))
    harness.assert_blocked(response, "no-seven")
    assert node.wait_for_url("/trusted/seven")["client"] == "192.0.2.7"
    response = raw_from("127.0.0.14", node.proxy, build_request(
        "GET", origins.url("/trusted/eight"), [("X-Forwarded-For", "192.0.2.8")]))
    echo = harness.assert_passed(response)
    assert echo_headers(echo, "x-forwarded-for") == ["192.0.2.8, 127.0.0.14"]
    assert node.wait_for_url("/trusted/eight")["client"] == "192.0.2.8"
    # From anybody else the same header changes nothing.
    response = raw_from("127.0.0.15", node.proxy, build_request("GET", origins.url("/untrusted/seven"), forged))
    harness.assert_passed(response)
    assert node.wait_for_url("/untrusted/seven")["client"] == "127.0.0.15"


# -- limits --------------------------------------------------------------------------------------

def test_one_address_over_its_connection_limit_is_refused_while_another_connects(node_factory, origins):
    node = node_factory.start(policy=make_policy(), args=["--max-connections-per-client", "3"])
    held = [connect_from("127.0.0.21", node.proxy) for _ in range(3)]
    # With workers, two of them accept from the queue at once: the fourth must come after the
    # three are counted, or one of those could be the one refused.
    harness.wait_until(lambda: sum(w["connections"] for w in node.health()[1].get("workers", [])) == 3
                       or not node.health()[1].get("workers"), 10, "the three connections accepted")
    try:
        assert closed_at_once("127.0.0.21", node.proxy)
        harness.wait_until(lambda: node.health()[1]["edge"]["per_client_refused"] == 1, 5, "the counter")
        # Another address is served meanwhile.
        harness.assert_passed(raw_from("127.0.0.22", node.proxy, build_request("GET", origins.url("/limit/other"))))
        # The held ones still work.
        held[0].sendall(build_request("GET", origins.url("/limit/held")))
        held[0].settimeout(10)
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    # Once they are closed, the address may connect again.
    harness.wait_until(lambda: _served_from("127.0.0.21", node, origins), 10, "127.0.0.21 served again")


def _served_from(source: str, node: harness.Node, origins) -> bool:
    try:
        return raw_from(source, node.proxy, build_request("GET", origins.url("/limit/again")), timeout=3).status == 200
    except (OSError, harness.HarnessError):
        return False


def test_silent_sockets_are_closed_at_the_first_byte_deadline(node_factory, origins):
    node = node_factory.start(policy=make_policy(), args=["--first-byte-timeout", "1", "--idle-timeout", "60"])
    started = time.monotonic()
    silent = [connect_from("127.0.0.23", node.proxy) for _ in range(20)]
    try:
        for sock in silent:
            assert closed_unanswered(sock, timeout=15)
        # Closed by the first-byte deadline, long before the idle timeout.
        assert time.monotonic() - started < 30
        harness.wait_until(lambda: node.health()[1]["edge"]["first_byte_timeouts"] >= 20, 5, "the counter")
    finally:
        for sock in silent:
            sock.close()
    # A connection that speaks in time is served, and then gets the keep-alive idle timeout.
    with connect_from("127.0.0.23", node.proxy) as sock:
        sock.sendall(build_request("GET", origins.url("/first-byte/served")))
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.settimeout(2.5)
        with pytest.raises(socket.timeout):
            sock.recv(1)  # still open after the first-byte deadline has long passed
