"""CONNECT decisions taken from the per-version memo answer exactly as fresh ones: the block,
the port check and the record, tunnel after tunnel (StringTransport, no sockets)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory

HOURS = {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "from": "00:00", "to": "23:59",
         "timezone": "UTC"}
POLICY = {
    "format": "safesquid-policy/1",
    "access": {
        "default_action": "allow",
        "rules": [
            {"name": "no-games", "action": "deny", "reason": "games are blocked", "domains": ["*.games.test"]},
            {"name": "no-chat-hours", "action": "deny", "domains": ["chat.test"], "schedule": HOURS},
        ],
    },
}


def factory_and_records():
    reactor = MemoryReactorClock()
    policy = policy_from_document(POLICY, 7)
    records = []
    factory = ProxyFactory(
        reactor=reactor, limits=Limits(), node_name="unit", current_policy=lambda: policy,
        record_sink=records.append, resolver=Resolver(reactor),
    )
    return factory, policy, records


def connect(factory, target: bytes) -> bytes:
    proto = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    proto.makeConnection(transport)
    proto.dataReceived(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
    return transport.value()


def test_a_remembered_block_answers_and_records_as_the_first() -> None:
    factory, policy, records = factory_and_records()
    answers = [connect(factory, b"a.games.test:443") for _ in range(3)]
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 403") and b"no-games" in answer
    assert [(r.action, r.rule, r.method, r.url) for r in records] == [("deny", "no-games", "CONNECT", "a.games.test:443")] * 3
    assert any(d.rule == "no-games" for d in policy.compiled._decisions.values())


def test_the_port_check_still_applies_to_a_remembered_allow() -> None:
    factory, _policy, records = factory_and_records()
    for _ in range(2):
        answer = connect(factory, b"www.test:25")
        assert answer.startswith(b"HTTP/1.1 403") and b"connect-ports" in answer
    assert [r.rule for r in records] == ["connect-ports", "connect-ports"]


def test_a_scheduled_rule_is_decided_afresh_every_time() -> None:
    factory, policy, records = factory_and_records()
    for _ in range(2):
        assert connect(factory, b"chat.test:443").startswith(b"HTTP/1.1 403")
    assert [r.rule for r in records] == ["no-chat-hours", "no-chat-hours"]
    assert not any(d.rule == "no-chat-hours" for d in policy.compiled._decisions.values())  # never kept
