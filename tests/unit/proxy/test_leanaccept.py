"""Accepting with LeanServer transports (proxy/leanaccept.py): real loopback sockets on a memory
reactor, the test calling doRead as the reactor would when the sockets are readable."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactor
from zope.interface import implementer

from safesquid_tw.proxy import leanaccept


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.data = []
        self.lost = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.lost.append(reason)


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    close_on_end = False

    def __init__(self) -> None:
        super().__init__()
        self.ended = 0

    def readConnectionLost(self) -> None:
        self.ended += 1
        if self.close_on_end:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Factory(protocol.Factory):
    def __init__(self, kind=Recorder, refuse: bool = False) -> None:
        self.kind = kind
        self.refuse = refuse
        self.built = []

    def buildProtocol(self, addr):
        if self.refuse:
            return None
        p = self.kind()
        p.factory = self
        p.addr = addr
        self.built.append(p)
        return p


@pytest.fixture
def listening():
    made = []

    def make(factory):
        reactor = MemoryReactor()
        port = tcp.Port(0, factory, 50, "127.0.0.1", reactor=reactor)
        port.startListening()
        assert leanaccept.install(port) is True
        made.append(port)
        return port

    yield make
    for port in made:
        port.socket.close()


def connect(port) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    return client


def wait_readable(sock) -> None:
    import select

    assert select.select([sock], [], [], 5)[0]


def test_every_waiting_client_is_accepted_with_a_lean_transport(listening) -> None:
    factory = Factory()
    port = listening(factory)
    clients = [connect(port) for _ in range(3)]
    try:
        wait_readable(port.socket)
        port.doRead()
        assert len(factory.built) == 3
        for p, client in zip(factory.built, clients):
            t = p.transport
            assert isinstance(t, leanaccept.LeanServer) and isinstance(t, tcp.Server)
            assert t.connected and t.getPeer().port in {c.getsockname()[1] for c in clients}
            assert p.addr.host == "127.0.0.1" and t.getPeer() == p.addr  # built once, at accept
            # Made on demand only, with Twisted's contents.
            assert t.logPrefix() == f"Recorder,{t.sessionno},127.0.0.1"
            assert repr(t) == f"<Recorder #{t.sessionno} on {port.getHost().port}>"
            assert t.socket.gettimeout() == 0.0  # non-blocking
            # Inherited from the listening socket (Linux), so setTcpNoDelay needs no call.
            assert t.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            t.setTcpNoDelay(True)
        assert sorted(p.transport.sessionno for p in factory.built) == [0, 1, 2]
        assert port.numberAccepts == 3  # fewer than asked for: next time as many as came
        port.doRead()  # nobody waiting: nothing happens
        assert len(factory.built) == 3
    finally:
        for c in clients:
            c.close()


def test_a_refused_client_is_closed(listening) -> None:
    port = listening(Factory(refuse=True))
    client = connect(port)
    try:
        wait_readable(port.socket)
        port.doRead()
        client.settimeout(5)
        assert client.recv(10) == b""
    finally:
        client.close()


def test_data_and_the_end_reach_a_plain_protocol_as_with_twisted(listening) -> None:
    factory = Factory()
    port = listening(factory)
    client = connect(port)
    try:
        wait_readable(port.socket)
        port.doRead()
        [p] = factory.built
        t = p.transport
        client.sendall(b"hello")
        wait_readable(t.socket)
        assert t.doRead() is None
        assert p.data == [b"hello"]
        client.shutdown(socket.SHUT_WR)
        wait_readable(t.socket)
        # Not half-closeable: the reactor is told the connection is done, and ends it.
        assert t.doRead() is tcp.main.CONNECTION_DONE
    finally:
        client.close()


@pytest.mark.parametrize("close_on_end", [False, True])
def test_the_end_reaches_a_half_closing_protocol_before_the_socket_is_unwatched(listening, close_on_end) -> None:
    factory = Factory(HalfCloser)
    port = listening(factory)
    client = connect(port)
    try:
        wait_readable(port.socket)
        port.doRead()
        [p] = factory.built
        p.close_on_end = close_on_end
        t = p.transport
        reactor = port.reactor
        assert t in reactor.readers
        client.shutdown(socket.SHUT_WR)
        wait_readable(t.socket)
        assert t.doRead() is None
        assert p.ended == 1
        assert t not in reactor.readers  # no more reading either way
        if close_on_end:
            # Twisted's loseConnection: closed once the (empty) buffer is written.
            assert t.disconnecting and t in reactor.writers
            assert t.doWrite() is tcp.main.CONNECTION_DONE
        else:
            assert p.lost == [] and t.connected
            t.write(b"still writing")  # the other direction goes on
            t.doWrite()
            client.settimeout(5)
            assert client.recv(100) == b"still writing"
            t.loseConnection()
    finally:
        client.close()


def test_other_ports_are_left_alone() -> None:
    assert leanaccept.install(object()) is False
