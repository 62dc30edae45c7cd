"""ProxyService owns drain and resume (the master's tasks), timed by an injected clock."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.nodestate import NodeState
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory, ProxyService


def _service(reactor, state):
    limits = Limits()
    resolver = Resolver(reactor, threads_max=1, timeout=1.0, ttl=1.0)
    factory = ProxyFactory(reactor=reactor, limits=limits, node_name="n1", current_policy=lambda: None,
                           record_sink=lambda record: None, resolver=resolver)
    return ProxyService(reactor, "tcp:0:interface=127.0.0.1", factory, resolver, drain_grace=10.0, state=state)


def _greeting(factory) -> bytes:
    transport = StringTransport()
    factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 50000)).makeConnection(transport)
    return transport.value()


def test_drain_refuses_new_connections_only_after_the_grace_and_resume_undoes_it():
    reactor = MemoryReactorClock()
    state = NodeState(role="slave", node="n1")
    proxy = _service(reactor, state)
    assert proxy.drain().startswith("draining")
    assert state.draining and proxy.factory.closing
    reactor.advance(9.9)
    assert not proxy.factory.draining and _greeting(proxy.factory) == b""
    reactor.advance(0.2)
    assert proxy.factory.draining and b" 503 " in _greeting(proxy.factory)
    assert proxy.resume() == "resumed"
    assert not (state.draining or proxy.factory.draining or proxy.factory.closing)
    assert _greeting(proxy.factory) == b""


def test_resume_within_the_grace_cancels_the_refusal():
    reactor = MemoryReactorClock()
    proxy = _service(reactor, NodeState(role="slave", node="n1"))
    proxy.drain()
    reactor.advance(5)
    proxy.resume()
    reactor.advance(60)
    assert not proxy.factory.draining and not reactor.getDelayedCalls()
