"""HTTP at the margins, without sockets: a client connection and its origin connections driven over
StringTransports with a MemoryReactorClock.

Refused CONNECTs close, tunnels keep half-close, cut-short responses end cleanly and say so in the
record, interim responses are bounded, field names with "_" are dropped, and a pooled origin
connection that speaks out of turn is never reused.
"""

from __future__ import annotations

import json
import socket
import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.internet import error

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory
from safesquid_tw.proxy.upstream import MAX_INTERIM_RESPONSES

POLICY = {
    "format": "safesquid-policy/1",
    "access": {
        "default_action": "allow",
        "rules": [{"name": "no-games", "action": "deny", "domains": ["*.games.test"]}],
    },
    "connect": {"allowed_ports": [443]},
}


class HalfCloseTransport(StringTransport):
    """A StringTransport that remembers loseWriteConnection (TCP's shutdown of the send half)."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        self.producer = None  # as TCP transports do: no error when none is registered


class Rig:
    def __init__(self, **limits) -> None:
        self.reactor = MemoryReactorClock()
        policy = policy_from_document(POLICY, 3)
        self.records = []
        self.factory = ProxyFactory(
            reactor=self.reactor, limits=Limits(**limits), node_name="unit", current_policy=lambda: policy,
            record_sink=self.records.append, resolver=Resolver(self.reactor),
        )
        self.client = self.factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
        self.client_transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        self.client.makeConnection(self.client_transport)
        self._origins_seen = 0

    def send(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def origin(self):
        """Accept the newest outgoing connection: (protocol, transport)."""
        assert len(self.reactor.tcpClients) > self._origins_seen, "no connection to the origin was made"
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[self._origins_seen]
        self._origins_seen += 1
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(transport)
        return proto, transport

    def fail_connect(self, reason: Exception) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[self._origins_seen]
        self._origins_seen += 1
        factory.clientConnectionFailed(None, Failure(reason))

    @property
    def written(self) -> bytes:
        return self.client_transport.value()


def statuses(data: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


SMUGGLED = b"GET http://10.9.9.9/smuggled HTTP/1.1\r\nHost: 10.9.9.9\r\n\r\n"


# -- refused or failed CONNECT ------------------------------------------------------------------

@pytest.mark.parametrize("connect, status", [
    (b"CONNECT x.games.test:443 HTTP/1.1\r\nHost: x.games.test:443\r\n\r\n", 403),  # policy
    (b"CONNECT 10.0.0.1:25 HTTP/1.1\r\nHost: 10.0.0.1:25\r\n\r\n", 403),  # port not allowed
])
def test_a_refused_connect_closes_and_never_reads_what_followed(connect, status):
    rig = Rig()
    rig.send(connect + SMUGGLED)
    assert statuses(rig.written) == [status]
    assert rig.client_transport.disconnecting
    assert b"smuggled" not in rig.written and not rig.reactor.tcpClients
    assert [r.method for r in rig.records] == ["CONNECT"]


@pytest.mark.parametrize("reason, status", [
    (error.ConnectionRefusedError(), 502),
    (error.TimeoutError(), 504),
])
def test_a_failed_connect_closes_and_never_reads_what_followed(reason, status):
    rig = Rig()
    rig.send(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n" + SMUGGLED)
    rig.send(SMUGGLED)  # more arrives while the tunnel is being opened
    rig.fail_connect(reason)
    assert statuses(rig.written) == [status]
    assert rig.client_transport.disconnecting
    assert len(rig.reactor.tcpClients) == 1 and b"smuggled" not in rig.written
    assert [r.method for r in rig.records] == ["CONNECT"]


def test_a_connect_answered_with_407_closes_too():
    rig = Rig()
    policy = policy_from_document(dict(POLICY, authentication={"enabled": True, "realm": "corp", "exempt_networks": []}), 4)
    rig.factory.current_policy = lambda: policy
    rig.send(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n\x16\x03\x01 tls hello" + SMUGGLED)
    assert statuses(rig.written) == [407]
    assert rig.client_transport.disconnecting and not rig.reactor.tcpClients


# -- tunnels keep half-close -------------------------------------------------------------------

def open_connect_tunnel(rig: Rig):
    rig.send(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n")
    origin, origin_transport = rig.origin()
    assert statuses(rig.written) == [200]
    rig.client_transport.clear()
    return origin, origin_transport


def test_client_half_close_in_a_tunnel_lets_the_answer_through():
    rig = Rig()
    origin, origin_transport = open_connect_tunnel(rig)
    rig.send(b"u" * 100_000)
    rig.client.readConnectionLost()  # the client shut down its sending half
    assert origin_transport.value() == b"u" * 100_000
    assert origin_transport.write_closed and not origin_transport.disconnecting
    assert not rig.client_transport.disconnecting
    origin.dataReceived(b"answer " * 1000)  # the origin answers after the upload ended
    assert rig.written == b"answer " * 1000
    origin.readConnectionLost()  # and then ends too: now the tunnel closes
    assert rig.client_transport.disconnecting and origin_transport.disconnecting
    assert rig.records[-1].method == "CONNECT" and rig.records[-1].bytes_out == 7000


def test_origin_half_close_in_a_tunnel_lets_the_upload_through():
    rig = Rig()
    origin, origin_transport = open_connect_tunnel(rig)
    origin.dataReceived(b"greeting")
    origin.readConnectionLost()
    assert rig.client_transport.write_closed and not rig.client_transport.disconnecting
    rig.send(b"still uploading")
    assert origin_transport.value() == b"still uploading"
    rig.client.readConnectionLost()
    assert rig.client_transport.disconnecting and origin_transport.disconnecting


def test_client_half_close_before_the_tunnel_is_open_is_passed_on():
    rig = Rig()
    rig.send(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\nearly bytes")
    rig.client.readConnectionLost()
    origin, origin_transport = rig.origin()
    assert origin_transport.value() == b"early bytes" and origin_transport.write_closed
    origin.dataReceived(b"late answer")
    assert rig.written.endswith(b"late answer")


def test_websocket_tunnel_keeps_half_close():
    rig = Rig()
    rig.send(b"GET http://10.0.0.1/ws HTTP/1.1\r\nHost: 10.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    origin, origin_transport = rig.origin()
    origin.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert statuses(rig.written) == [101]
    rig.send(b"frame")
    rig.client.readConnectionLost()
    assert origin_transport.write_closed and not rig.client_transport.disconnecting
    origin.dataReceived(b"reply")
    assert rig.written.endswith(b"reply")
    origin.readConnectionLost()
    assert rig.client_transport.disconnecting


def test_plain_http_client_half_close_still_ends_the_connection():
    rig = Rig()
    lost = []
    rig.client_transport.connectionLost = lost.append
    rig.send(b"GET http://10.0.0.1/ HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")
    rig.client.readConnectionLost()
    assert lost and lost[0].check(error.ConnectionDone)


# -- responses cut short by the origin -----------------------------------------------------------

def start_get(rig: Rig, path: bytes = b"/f", method: bytes = b"GET"):
    rig.send(method + b" http://10.0.0.1" + path + b" HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")
    return rig.origin()


@pytest.mark.parametrize("head, body", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 400),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"190\r\n" + b"x" * 400 + b"\r\n"),
])
@pytest.mark.parametrize("ending", ["close", "reset", "stall"])
def test_a_cut_short_response_keeps_what_came_and_closes_cleanly(head, body, ending):
    rig = Rig(read_timeout=5.0)
    origin, origin_transport = start_get(rig)
    origin.dataReceived(head + body)
    if ending == "close":
        origin.connectionLost(Failure(error.ConnectionDone()))
    elif ending == "reset":
        origin.connectionLost(Failure(error.ConnectionLost()))
    else:
        rig.reactor.advance(6.0)
    written = rig.written
    assert statuses(written) == [200]
    assert written.count(b"x") == 400
    assert not written.endswith(b"0\r\n\r\n")  # no last chunk: the client can tell
    assert rig.client_transport.disconnecting  # a clean close (loseConnection), not an abort
    record = rig.records[-1]
    assert record.transfer == "origin_incomplete" and record.status == 200
    assert json.loads(record.to_json_line())["transfer"] == "origin_incomplete"


def test_a_complete_response_is_recorded_complete():
    rig = Rig()
    origin, _ = start_get(rig)
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert rig.records[-1].transfer == "complete"
    assert not rig.client_transport.disconnecting


# -- interim responses -----------------------------------------------------------------------

def test_interim_responses_are_relayed_up_to_the_bound():
    rig = Rig()
    origin, _ = start_get(rig)
    origin.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * MAX_INTERIM_RESPONSES
                        + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert statuses(rig.written) == [103] * MAX_INTERIM_RESPONSES + [200]


def test_a_flood_of_interim_responses_is_502_and_close():
    rig = Rig()
    origin, origin_transport = start_get(rig)
    for _ in range(1000):
        if origin_transport.disconnecting or origin_transport.disconnected:
            break
        origin.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n" * 10)
    assert statuses(rig.written) == [100] * MAX_INTERIM_RESPONSES + [502]
    assert len(rig.written) < 10_000  # bounded whatever the origin sends
    assert rig.client_transport.disconnecting
    assert rig.records[-1].status == 502


# -- field names with "_" ------------------------------------------------------------------------

def test_field_names_with_underscores_are_dropped():
    rig = Rig()
    rig.send(b"GET http://10.0.0.1/ HTTP/1.1\r\nHost: 10.0.0.1\r\nX_Forwarded_For: 6.6.6.6\r\n"
             b"Remote_User: admin\r\nX-Kept: yes\r\n\r\n")
    _origin, origin_transport = rig.origin()
    sent = origin_transport.value().lower()
    assert b"x-kept: yes" in sent
    assert b"x_forwarded_for" not in sent and b"remote_user" not in sent and b"6.6.6.6" not in sent


# -- pooled connections that speak out of turn ------------------------------------------------

def test_late_bytes_after_a_head_answer_are_never_given_to_the_next_request():
    rig = Rig()
    origin, origin_transport = start_get(rig, method=b"HEAD")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n")
    assert rig.factory.pool.idle_count == 1
    # the body a HEAD must not have, arriving late while the connection idles in the pool
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npoison")
    assert origin_transport.disconnecting or origin_transport.disconnected or origin_transport._aborted
    assert rig.factory.pool.idle_count == 0
    rig.send(b"GET http://10.0.0.1/next HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")
    assert len(rig.reactor.tcpClients) == 2  # a fresh connection, not the tainted one
    assert b"poison" not in rig.written


@pytest.mark.parametrize("status", [204, 304])
def test_bytes_behind_a_bodiless_answer_make_the_connection_unusable(status):
    rig = Rig()
    origin, origin_transport = start_get(rig)
    origin.dataReceived(b"HTTP/1.1 %d X\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npoison" % status)
    assert statuses(rig.written) == [status]
    assert rig.factory.pool.idle_count == 0 and origin_transport.disconnecting
    assert b"poison" not in rig.written


def test_a_clean_bodiless_answer_is_pooled():
    rig = Rig()
    origin, _ = start_get(rig)
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert rig.factory.pool.idle_count == 1


class SocketBackedTransport(HalfCloseTransport):
    """getHandle() is a real socket, so the pool's peek for unread bytes has something to look at."""

    def __init__(self, sock, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sock = sock

    def getHandle(self):
        return self._sock


@pytest.mark.parametrize("late, reused", [(b"", True), (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\npoison", False)])
def test_bytes_the_reactor_has_not_read_yet_keep_a_pooled_connection_out_of_use(late, reused):
    # The late bytes are already in the socket when the next request takes the pooled connection
    # in the same instant: without a look at the socket they would be read as its response.
    rig = Rig()
    ours, theirs = socket.socketpair()
    try:
        rig.send(b"GET http://10.0.0.1/a HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")
        host, port, factory, _timeout, _bind = rig.reactor.tcpClients[0]
        rig._origins_seen = 1
        origin = factory.buildProtocol(IPv4Address("TCP", host, port))
        origin.makeConnection(SocketBackedTransport(ours, peerAddress=IPv4Address("TCP", host, port)))
        origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert rig.factory.pool.idle_count == 1
        if late:
            theirs.sendall(late)
        rig.send(b"GET http://10.0.0.1/b HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")
        assert (len(rig.reactor.tcpClients) == 1) is reused
    finally:
        ours.close()
        theirs.close()


def test_a_reset_ends_a_close_delimited_body_as_incomplete():
    rig = Rig()
    origin, _ = start_get(rig)
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 100)
    origin.connectionLost(Failure(error.ConnectionLost()))
    assert not rig.written.endswith(b"0\r\n\r\n") and rig.client_transport.disconnecting
    assert rig.records[-1].transfer == "origin_incomplete"


def test_a_close_ends_a_close_delimited_body_completely():
    rig = Rig()
    origin, _ = start_get(rig)
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 100)
    origin.connectionLost(Failure(error.ConnectionDone()))
    assert rig.written.endswith(b"0\r\n\r\n")
    assert rig.records[-1].transfer == "complete"
