"""The lean event dispatch: installed on epoll reactors only, once, and events still reach the
connections (read, and the disconnection that follows an error) without the log context."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.testing import MemoryReactor

from safesquid_tw.proxy import fastdispatch

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class Reader:
    """The least a selectable needs for the reactor's dispatch."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.reads = []
        self.lost = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self):
        if self.fail:
            raise RuntimeError("boom")
        self.reads.append(self.sock.recv(100))

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


@pytest.fixture
def reactor():
    reactor = epollreactor.EPollReactor()
    yield reactor
    reactor._poller.close()


def test_installed_on_epoll_reactors_once_and_not_elsewhere(reactor):
    assert fastdispatch.install(reactor) is True
    assert fastdispatch.install(reactor) is False  # already there
    assert fastdispatch.install(MemoryReactor()) is False


def test_a_read_event_reaches_the_selectable(reactor):
    fastdispatch.install(reactor)
    ours, theirs = socket.socketpair()
    try:
        reader = Reader(ours)
        reactor.addReader(reader)
        theirs.send(b"hello")
        reactor.doIteration(1.0)
        assert reader.reads == [b"hello"]
        reactor.removeReader(reader)
    finally:
        ours.close()
        theirs.close()


def test_an_exception_in_a_handler_disconnects_that_selectable_only(reactor):
    fastdispatch.install(reactor)
    pairs = [socket.socketpair(), socket.socketpair()]
    try:
        bad, good = Reader(pairs[0][0], fail=True), Reader(pairs[1][0])
        reactor.addReader(bad)
        reactor.addReader(good)
        pairs[0][1].send(b"x")
        pairs[1][1].send(b"y")
        reactor.doIteration(1.0)
        assert len(bad.lost) == 1 and bad.lost[0].check(RuntimeError)
        assert good.reads == [b"y"] and not good.lost
        reactor.removeReader(good)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


class Recorder:
    """A protocol for a real tcp.Connection: what arrived, and how the connection ended."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.data = []
        self.lost = []

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("boom")
        self.data.append(data)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


def _connection(reactor, sock, protocol):
    from twisted.internet import tcp

    sock.setblocking(False)
    conn = tcp.Connection(sock, protocol, reactor)
    conn.connected = 1
    protocol.makeConnection(conn)
    reactor.addReader(conn)
    return conn


def test_a_tcp_connection_is_read_in_the_loop(reactor):
    from twisted.internet import tcp

    fastdispatch.install(reactor)
    ours, theirs = socket.socketpair()
    try:
        proto = Recorder()
        conn = _connection(reactor, ours, proto)
        assert fastdispatch.reads_directly(tcp.Connection)
        theirs.send(b"hello")
        reactor.doIteration(1.0)
        assert proto.data == [b"hello"] and not proto.lost
        reactor.removeReader(conn)
    finally:
        ours.close()
        theirs.close()


def test_the_end_of_the_stream_and_errors_disconnect_as_twisted_does(reactor):
    from twisted.internet import error

    fastdispatch.install(reactor)
    pairs = [socket.socketpair(), socket.socketpair()]
    try:
        ended, failing = Recorder(), Recorder(fail=True)
        _connection(reactor, pairs[0][0], ended)
        _connection(reactor, pairs[1][0], failing)
        pairs[0][1].close()  # the peer's end: CONNECTION_DONE
        pairs[1][1].send(b"x")  # the protocol raises: disconnected with that exception
        for _ in range(3):
            if ended.lost and failing.lost:
                break
            reactor.doIteration(1.0)
        assert len(ended.lost) == 1 and ended.lost[0].check(error.ConnectionDone)
        assert len(failing.lost) == 1 and failing.lost[0].check(RuntimeError)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_classes_that_read_their_own_way_keep_twisted_dispatch():
    from twisted.internet import tcp

    class OwnRead(tcp.Connection):
        def doRead(self):
            return None

    assert fastdispatch.reads_directly(tcp.Server) and fastdispatch.reads_directly(tcp.Client)
    assert not fastdispatch.reads_directly(OwnRead)
    assert not fastdispatch.reads_directly(tcp.Port)


def test_lean_accepted_connections_are_read_in_the_loop_and_end_their_input_their_way():
    """leanaccept.LeanServer reads as tcp.Connection does; only the end of its input differs."""
    from safesquid_tw.proxy import leanaccept

    assert fastdispatch.reads_directly(leanaccept.LeanServer)
    assert callable(getattr(leanaccept.LeanServer, "input_ended", None))
