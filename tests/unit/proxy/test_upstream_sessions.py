"""The pool keeps a verified origin connection's TLS session once, when it first goes idle, and
never one whose certificate was only tolerated."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from safesquid_tw.config import Limits
from safesquid_tw.proxy.upstream import UpstreamConnection, UpstreamPool


class _TLS:
    def __init__(self) -> None:
        self.kept: list[tuple[str, int]] = []

    def remember(self, transport, host: str, port: int) -> None:
        self.kept.append((host, port))


class _Transport:
    connected = True

    def loseConnection(self) -> None:
        pass


def _pool_and_conn(tolerated: bool):
    pool = UpstreamPool(MemoryReactorClock(), resolver=None, limits=Limits())
    pool.tls = _TLS()
    conn = UpstreamConnection(pool, ("https", "origin.test", 443), "192.0.2.1:443")
    conn.transport = _Transport()
    conn.gate = None
    conn.tls_tolerated = tolerated
    conn.tls_session_kept = tolerated  # as handshakeCompleted sets it
    return pool, conn


def test_a_verified_connection_leaves_its_session_once():
    pool, conn = _pool_and_conn(tolerated=False)
    pool.release(conn)
    pool.take_idle(conn.key)
    pool.release(conn)
    assert pool.tls.kept == [("origin.test", 443)]


def test_a_tolerated_connection_leaves_none():
    pool, conn = _pool_and_conn(tolerated=True)
    pool.release(conn)
    assert pool.tls.kept == []
