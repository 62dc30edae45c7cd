"""CONNECT tunnels on directly connected origin sockets (proxy/tunnelfast.py).

The client side is a memory transport driven by hand; the origin side is a real loopback socket
(the point of the module is what it does with one), with the test playing the reactor: it calls
the origin socket's doWrite/doRead once select() says the event is there, and moves the clock for
the sweep. Half-close, exact byte counts, failures, deadlines and back-pressure.
"""

from __future__ import annotations

import select
import socket

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory
from safesquid_tw.proxy.tunnel import Tunnel
from safesquid_tw.proxy.tunnelfast import FastTunnel, OriginSocket, open_tunnel


class HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        self.producer = None


@pytest.fixture
def listener():
    skt = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    skt.bind(("127.0.0.1", 0))
    skt.listen(8)
    skt.settimeout(5)
    yield skt
    skt.close()


class Rig:
    def __init__(self, port: int, ask_again: bool = False, **limits) -> None:
        self.reactor = MemoryReactorClock()
        policy = policy_from_document({
            "format": "safesquid-policy/1",
            "access": {"default_action": "allow", "rules": []},
            "connect": {"allowed_ports": [port]},
        }, 7)
        self.records = []
        self.factory = ProxyFactory(
            reactor=self.reactor, limits=Limits(**limits), node_name="unit", current_policy=lambda: policy,
            record_sink=self.records.append, resolver=Resolver(self.reactor),
        )
        self.factory.tunnel_sweep.direct = True  # as on a real reactor
        # The connecting phase is driven by hand here: wait for writability even to loopback
        # (test_a_nearby_origin_connects_at_once covers the tunnel that opens at once).
        self.factory.tunnel_sweep.ask_again = ask_again
        self.port = port
        self.client = self.factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
        self.client_transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        self.client.makeConnection(self.client_transport)

    def connect(self, authority: str | None = None) -> None:
        authority = authority or f"127.0.0.1:{self.port}"
        self.client.dataReceived(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())

    @property
    def tunnel(self) -> FastTunnel:
        assert isinstance(self.client.tunnel, FastTunnel)
        return self.client.tunnel

    @property
    def origin(self) -> OriginSocket:
        return self.tunnel.origin

    def finish_connect(self) -> None:
        origin = self.origin
        assert origin in self.reactor.getWriters()
        select.select([], [origin.socket], [], 5)
        origin.doWrite()

    def origin_event(self) -> None:
        origin = self.origin
        assert origin in self.reactor.getReaders()
        ready, _, _ = select.select([origin.socket], [], [], 5)
        assert ready, "nothing arrived from the origin"
        origin.doRead()


def open_tunnel_to(listener) -> tuple[Rig, socket.socket]:
    rig = Rig(listener.getsockname()[1])
    rig.connect()
    far, _ = listener.accept()
    far.settimeout(5)
    rig.finish_connect()
    assert rig.client_transport.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    rig.client_transport.clear()
    return rig, far


def read_exactly(skt: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = skt.recv(n - len(data))
        assert piece, "closed early"
        data += piece
    return data


def test_a_memory_reactor_keeps_the_pooled_tunnel():
    rig = Rig(443)
    rig.factory.tunnel_sweep.direct = False
    assert isinstance(open_tunnel(rig.client, None), Tunnel)


def test_bytes_flow_both_ways_and_the_record_counts_them(listener):
    rig, far = open_tunnel_to(listener)
    rig.client.dataReceived(b"hello origin")
    assert read_exactly(far, 12) == b"hello origin"
    far.sendall(b"hello client, at length")
    rig.origin_event()
    assert rig.client_transport.value() == b"hello client, at length"
    # The origin ends first: the client's read side ends, the upload goes on.
    far.shutdown(socket.SHUT_WR)
    rig.origin_event()
    assert rig.client_transport.write_closed and not rig.client_transport.disconnecting
    assert rig.origin not in rig.reactor.getReaders()
    rig.client.dataReceived(b"more")
    assert read_exactly(far, 4) == b"more"
    rig.client.readConnectionLost()
    assert far.recv(10) == b""  # the origin socket is closed
    assert rig.client_transport.disconnecting
    (record,) = rig.records
    assert record.method == "CONNECT" and record.status == 200
    assert record.bytes_out == len(b"hello client, at length")
    assert record.bytes_in == len(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                                  % (rig.port, rig.port)) + len(b"hello origin") + 4
    far.close()


def test_client_half_close_is_passed_on_and_the_answer_still_comes(listener):
    rig, far = open_tunnel_to(listener)
    rig.client.dataReceived(b"request")
    rig.client.readConnectionLost()  # the client shut down its sending half
    assert read_exactly(far, 7) == b"request"
    assert far.recv(10) == b""  # the FIN reached the origin
    assert not rig.client_transport.disconnecting
    far.sendall(b"answer after the upload ended")
    rig.origin_event()
    assert rig.client_transport.value() == b"answer after the upload ended"
    far.close()
    rig.origin_event()  # the origin's end: now the tunnel closes
    assert rig.client_transport.disconnecting
    assert rig.records[-1].bytes_out == len(b"answer after the upload ended")
    assert not rig.factory.tunnel_sweep.live


def test_bytes_sent_while_connecting_and_an_early_half_close_are_passed_on(listener):
    rig = Rig(listener.getsockname()[1])
    rig.connect()
    rig.client.dataReceived(b"early bytes")
    rig.client.readConnectionLost()
    far, _ = listener.accept()
    far.settimeout(5)
    rig.finish_connect()
    assert read_exactly(far, 11) == b"early bytes"
    assert far.recv(10) == b""
    far.close()


def test_a_refused_connect_answers_502_records_and_closes(listener):
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there any more
    rig = Rig(port)
    rig.connect()
    rig.client.dataReceived(b"GET http://10.9.9.9/smuggled HTTP/1.1\r\nHost: 10.9.9.9\r\n\r\n")
    origin = rig.client.tunnel.origin if rig.client.tunnel is not None else None
    if origin is not None:  # the refusal comes as an event (else connect() said so at once)
        select.select([], [origin.socket], [], 5)
        origin.doWrite()
    written = rig.client_transport.value()
    assert written.startswith(b"HTTP/1.1 502 ") and b"smuggled" not in written
    assert rig.client_transport.disconnecting
    (record,) = rig.records
    assert record.method == "CONNECT" and record.action == "error" and "refused" in record.detail


def test_a_nearby_origin_connects_at_once(listener):
    rig = Rig(listener.getsockname()[1], ask_again=True)
    rig.connect()
    # Loopback: the handshake completed within connect(); asked again, the socket says so, and
    # the 200 leaves within the CONNECT's own read, the origin watched for reading only.
    assert rig.client_transport.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    origin = rig.origin
    assert origin.connected and origin in rig.reactor.getReaders() and origin not in rig.reactor.getWriters()
    far, _ = listener.accept()
    far.settimeout(5)
    rig.client.dataReceived(b"hello")
    assert read_exactly(far, 5) == b"hello"
    far.close()
    rig.origin_event()
    rig.client.readConnectionLost()
    (record,) = rig.records
    assert record.status == 200 and record.bytes_in > 5
    assert rig.factory.pool.connections_made == 1


def test_a_nearby_refusal_answers_502_at_once(listener):
    port = listener.getsockname()[1]
    listener.close()
    rig = Rig(port, ask_again=True)
    rig.connect()
    assert rig.client_transport.value().startswith(b"HTTP/1.1 502 ")
    assert "refused" in rig.records[-1].detail


def test_a_connect_to_this_proxy_itself_is_a_loop(listener):
    rig = Rig(listener.getsockname()[1])
    rig.factory.listening.append(("127.0.0.1", rig.port))
    rig.connect()
    assert rig.client_transport.value().startswith(b"HTTP/1.1 508 ")
    assert rig.records[-1].detail.endswith("is this proxy itself")


def test_a_connect_that_takes_too_long_answers_504(listener):
    rig = Rig(listener.getsockname()[1], connect_timeout=3.0)
    rig.connect()
    origin = rig.origin
    rig.reactor.advance(2.5)
    assert rig.client.tunnel is not None and not rig.client_transport.value()
    for _ in range(3):
        rig.reactor.advance(0.75)
    assert rig.client_transport.value().startswith(b"HTTP/1.1 504 ")
    assert "took longer than 3 s" in rig.records[-1].detail
    assert origin not in rig.reactor.getWriters() and origin.fileno() == -1


def test_an_idle_tunnel_is_closed_and_a_busy_one_is_not(listener):
    rig = Rig(listener.getsockname()[1], tunnel_idle_timeout=4.0)
    rig.connect()
    far, _ = listener.accept()
    far.settimeout(5)
    rig.finish_connect()
    for _ in range(12):  # busy for 12 s: never idle for 4
        rig.client.dataReceived(b"x")
        rig.reactor.advance(1.0)
    assert not rig.client_transport.disconnecting
    assert read_exactly(far, 12) == b"x" * 12
    for _ in range(6):  # idle for 4 s: closed within one sweep period of that
        rig.reactor.advance(1.0)
    assert rig.client_transport.disconnecting
    assert rig.records[-1].detail.startswith("tunnel idle (4 s")
    with pytest.raises(ConnectionResetError):  # the origin was cut off (a reset, as before)
        far.recv(10)
    far.close()


def test_the_sweep_stops_once_no_tunnel_is_left(listener):
    rig, far = open_tunnel_to(listener)
    sweep = rig.factory.tunnel_sweep
    assert sweep.live
    far.close()
    rig.origin_event()
    rig.client.readConnectionLost()
    assert not sweep.live
    rig.reactor.advance(sweep.period)
    assert sweep._call is None


def test_an_origin_that_reads_slowly_pauses_the_client_until_it_drains(listener):
    rig, far = open_tunnel_to(listener)
    origin = rig.origin
    chunk = b"u" * 65536
    sent = 0
    while not origin.dataBuffer and not origin._tempDataBuffer:
        rig.client.dataReceived(chunk)  # until the kernel's buffers are full
        sent += len(chunk)
        assert sent < 64 << 20
    for _ in range(4):
        rig.client.dataReceived(chunk)
        sent += len(chunk)
    assert rig.client_transport.producerState == "paused"  # the client is not read meanwhile
    received = 0
    while received < sent:
        received += len(far.recv(1 << 20))
        if (origin.dataBuffer or origin._tempDataBuffer) and select.select([], [origin.socket], [], 0)[1]:
            origin.doWrite()
    assert received == sent
    assert rig.client_transport.producerState == "producing"
    assert rig.tunnel.bytes_from_client == sent
    far.close()


def test_a_slow_client_pauses_reading_from_the_origin(listener):
    rig, far = open_tunnel_to(listener)
    far.sendall(b"answer")
    rig.origin_event()
    producer = rig.client_transport.producer  # a memory transport is not plain TCP: registered at once
    assert producer is not None
    producer.pauseProducing()
    assert rig.origin not in rig.reactor.getReaders()
    producer.resumeProducing()
    assert rig.origin in rig.reactor.getReaders()
    far.close()


# -- on an epoll reactor: the whole tunnel through real sockets, accept to close -------------------

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class EpollRig:
    """A proxy port (lean accept) on an epoll reactor that the test turns by hand."""

    def __init__(self, origin_port: int) -> None:
        from twisted.internet import tcp

        from safesquid_tw.proxy import fastdispatch, leanaccept

        self.reactor = reactor = epollreactor.EPollReactor()
        fastdispatch.install(reactor)
        policy = policy_from_document({
            "format": "safesquid-policy/1",
            "access": {"default_action": "allow", "rules": []},
            "connect": {"allowed_ports": [origin_port]},
        }, 7)
        self.records = []
        self.factory = ProxyFactory(
            reactor=reactor, limits=Limits(), node_name="unit", current_policy=lambda: policy,
            record_sink=self.records.append, resolver=Resolver(reactor),
        )
        self.port = tcp.Port(0, self.factory, 50, "127.0.0.1", reactor=reactor)
        self.port.startListening()
        assert leanaccept.install(self.port)
        self.watched_at_start = set(reactor._selectables)

    def turn_until(self, condition, timeout: float = 5.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.02)

    def receive(self, skt: socket.socket, n: int) -> bytes:
        """Turn the reactor until `n` bytes or the end came from `skt`."""
        data = b""

        def enough() -> bool:
            nonlocal data
            while select.select([skt], [], [], 0)[0]:
                piece = skt.recv(max(1, n - len(data)))
                if not piece:
                    return True
                data += piece
                if len(data) >= n:
                    return True
            return False

        self.turn_until(enough)
        return data

    def close(self) -> None:
        self.factory.tunnel_sweep.stop()
        self.port.socket.close()
        self.reactor._poller.close()


@pytest.mark.parametrize("origin_ends_first", [True, False])
def test_a_whole_tunnel_on_epoll_leaves_nothing_watched_and_one_record(listener, origin_ends_first) -> None:
    rig = EpollRig(listener.getsockname()[1])
    try:
        client = socket.create_connection(("127.0.0.1", rig.port.getHost().port), timeout=5)
        authority = f"127.0.0.1:{listener.getsockname()[1]}"
        client.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        rig.turn_until(lambda: rig.factory.tunnel_sweep.live)
        far, _ = listener.accept()
        far.settimeout(5)
        reply = b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert rig.receive(client, len(reply)) == reply
        [conn] = rig.factory.connections
        origin = conn.tunnel.origin
        # Connected: watched for reading only (one epoll change from writing).
        fd = origin.fileno()
        assert fd in rig.reactor._reads and fd not in rig.reactor._writes
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert rig.receive(far, 18) == b"GET / HTTP/1.1\r\n\r\n"
        if origin_ends_first:
            far.sendall(b"answer")
            far.shutdown(socket.SHUT_WR)
            assert rig.receive(client, 6) == b"answer"
            assert rig.receive(client, 1) == b""  # the end passed on
            assert not rig.records  # the upload direction is still open
            client.close()
            rig.turn_until(lambda: rig.records)
            assert far.recv(10) == b""
        else:
            client.shutdown(socket.SHUT_WR)
            assert rig.receive(far, 1) == b""  # the client's end passed on
            far.sendall(b"late answer")
            far.close()
            assert rig.receive(client, 11) == b"late answer"
            rig.turn_until(lambda: rig.records)
            assert client.recv(10) == b""
            client.close()
        far.close()
        [record] = rig.records
        assert record.method == "CONNECT" and record.status == 200 and record.action == "allow"
        assert record.bytes_out == (6 if origin_ends_first else 11)
        assert rig.factory.connections == set() and rig.factory.per_client == {}
        assert rig.factory.tunnel_sweep.live == set()
        # Both sockets closed and forgotten: only what was watched before the tunnel remains.
        assert set(rig.reactor._selectables) == rig.watched_at_start
        assert rig.reactor._reads | rig.reactor._writes <= rig.watched_at_start
        assert conn.transport.disconnected and not hasattr(conn.transport, "socket")
    finally:
        rig.close()


def test_close_now_leaves_a_transport_with_queued_bytes_to_twisted() -> None:
    from safesquid_tw.proxy.tunnelfast import close_now

    reactor = epollreactor.EPollReactor()
    ours, theirs = socket.socketpair()
    try:
        from twisted.internet import tcp

        lost = []

        class P:
            def connectionLost(self, reason) -> None:
                lost.append(reason)

        t = tcp.Connection(ours, P(), reactor)
        t.connected = 1
        t.startReading()
        t.dataBuffer = b"queued"
        assert close_now(t) is False and t.connected and lost == []
        t.dataBuffer = b""
        assert close_now(t) is True
        assert lost and ours.fileno() == -1 and ours.fileno() not in reactor._selectables
        assert theirs.recv(10) == b""
    finally:
        theirs.close()
        reactor._poller.close()
