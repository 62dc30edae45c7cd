"""The proxy's time is its reactor's, so a fake clock decides it: an access record's start is the
clock's time when the request head was read, its duration runs to the clock's time when the answer
went out (here held back by the guessing brake's timer), and a rule's schedule is read at the
clock's time too."""

import base64

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.proxy.guessing import FREE_FAILURES, MAX_DELAY
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory

START = 1_795_300_000.0


def factory_on(reactor, doc, records):
    policy = policy_from_document(doc, 1)
    return ProxyFactory(reactor=reactor, limits=Limits(), node_name="unit", current_policy=lambda: policy,
                        record_sink=records.append, resolver=Resolver(reactor))


def connect(factory, ip="10.1.2.3"):
    proto = factory.buildProtocol(IPv4Address("TCP", ip, 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 5555))
    proto.makeConnection(transport)
    return proto, transport


def test_a_refused_request_is_recorded_at_the_clocks_time():
    reactor = MemoryReactorClock()
    reactor.advance(START)
    records: list = []
    doc = {"format": "safesquid-policy/1",
           "access": {"default_action": "allow", "rules": [{"name": "no-b", "action": "deny", "domains": ["b.test"]}]}}
    proto, transport = connect(factory_on(reactor, doc, records))
    proto.dataReceived(b"GET http://b.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 403 ")
    [record] = records
    assert record.time == START
    assert record.duration_ms == 0.0


def test_an_answer_held_back_by_a_timer_is_recorded_with_the_clocks_duration():
    reactor = MemoryReactorClock()
    reactor.advance(START)
    records: list = []
    doc = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []},
           "authentication": {"enabled": True, "realm": "corp", "exempt_networks": []}}
    factory = factory_on(reactor, doc, records)
    for _ in range(FREE_FAILURES):
        factory.guessing.failed("10.1.2.3")
    proto, transport = connect(factory)
    token = base64.b64encode(b"mallory:guess")
    proto.dataReceived(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: Basic " + token + b"\r\n\r\n")
    proto._verified(None, proto.ctx)  # what the worker thread answers for a wrong password
    assert records == []
    reactor.advance(MAX_DELAY)
    assert transport.value().startswith(b"HTTP/1.1 407 ")
    [record] = records
    assert record.time == START
    assert record.duration_ms == MAX_DELAY * 1000.0


def test_a_scheduled_rule_is_read_at_the_clocks_time():
    wednesday_10_utc = 1_796_205_600.0
    doc = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": [
        {"name": "office-hours", "action": "deny", "domains": ["games.test"],
         "schedule": {"days": ["wed"], "from": "09:00", "to": "17:00", "timezone": "UTC"}}]}}
    reactor = MemoryReactorClock()
    reactor.advance(wednesday_10_utc)
    records: list = []
    factory = factory_on(reactor, doc, records)
    request = b"GET http://games.test/ HTTP/1.1\r\nHost: games.test\r\n\r\n"

    proto, transport = connect(factory)
    proto.dataReceived(request)
    assert transport.value().startswith(b"HTTP/1.1 403 ")
    assert records[-1].rule == "office-hours"

    reactor.advance(8 * 3600.0)  # 18:00: the rule is asleep, the default allows
    proto, transport = connect(factory)
    proto.dataReceived(request)
    assert not transport.value().startswith(b"HTTP/1.1 403 ")
