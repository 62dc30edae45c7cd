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
