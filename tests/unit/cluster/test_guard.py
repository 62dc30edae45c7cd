"""The master's control-plane guard, driven by a task.Clock: the key-proof deadline and byte
budget, per-source rate-limited refusal lines, and the failed-proof throttle."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.spread import pb
from zope.interface import implementer

from safesquid_tw.cluster.guard import ControlGuard, GuardedServerFactory, RefusalLog


@implementer(pb.IPBRoot)
class Root:
    def rootObject(self, broker):
        return pb.Referenceable()


def connect(guard: ControlGuard, accepted_at: float | None = None):
    factory = GuardedServerFactory(Root(), guard)
    broker = factory.buildProtocol(None)
    broker.accepted_at = accepted_at
    transport = StringTransport(peerAddress=None)
    transport.getPeer = lambda: type("Peer", (), {"host": "192.0.2.7"})()
    broker.makeConnection(transport)
    return broker, transport


def captured_lines():
    lines: list[str] = []

    def observer(event):
        if "guard" in str(event.get("log_namespace", "")):
            lines.append(event.get("message", ""))

    globalLogPublisher.addObserver(observer)
    return lines, lambda: globalLogPublisher.removeObserver(observer)


def test_no_key_proof_within_the_deadline_counted_from_the_accept_closes():
    clock = Clock()
    guard = ControlGuard(clock, auth_timeout=10.0)
    clock.advance(100.0)
    broker, transport = connect(guard, accepted_at=clock.seconds() - 4.0)  # TLS took 4 s
    clock.advance(5.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting or broker.closing
    assert guard.stats()["refused"] == {"auth_timeout": 1}


def test_login_stops_the_deadline_and_the_byte_budget():
    clock = Clock()
    guard = ControlGuard(clock, auth_timeout=10.0, auth_bytes=100)
    broker, transport = connect(guard)
    broker.login_completed()
    clock.advance(60)
    assert not broker.closing
    assert guard.stats()["refused_total"] == 0


def test_more_than_the_byte_budget_before_login_closes():
    clock = Clock()
    guard = ControlGuard(clock, auth_bytes=1000)
    broker, _transport = connect(guard)
    broker.dataReceived(b"\x20\x0d\x06\x82")  # a banana string of 100,000 bytes, arriving slowly
    for _ in range(5):
        broker.dataReceived(b"x" * 300)
    assert broker.closing
    assert guard.stats()["refused"] == {"auth_bytes": 1}


def test_refusal_lines_are_rate_limited_per_source():
    clock = Clock()
    log = RefusalLog(clock, window=60.0)
    assert log.warn("192.0.2.1", "refused one")
    assert not log.warn("192.0.2.1", "refused two")
    assert not log.warn("192.0.2.1", "refused three")
    assert log.warn("192.0.2.2", "another source is logged")
    clock.advance(60.0)
    lines, stop = captured_lines()
    try:
        assert log.warn("192.0.2.1", "refused four")
    finally:
        stop()
    assert log.lines == 3 and log.suppressed == 2


def test_failed_proofs_throttle_a_source_for_the_window():
    clock = Clock()
    guard = ControlGuard(clock, max_failed_proofs=3, proof_window=60.0)
    for _ in range(2):
        guard.proof_failed("192.0.2.9")
        clock.advance(1)
    assert guard.proofs_blocked("192.0.2.9") is None
    guard.proof_failed("192.0.2.9")
    wait = guard.proofs_blocked("192.0.2.9")
    assert wait is not None and 57 <= wait <= 60
    assert guard.proofs_blocked("192.0.2.10") is None
    clock.advance(61)
    assert guard.proofs_blocked("192.0.2.9") is None
