"""Wrong proxy passwords from one address are answered ever later; a right one clears that."""

import base64

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.proxy.guessing import FREE_FAILURES, MAX_CLIENTS, MAX_DELAY, GuessingBrake
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory


def test_a_few_mistakes_are_free_then_each_costs_more_up_to_the_ceiling():
    brake = GuessingBrake()
    delays = [brake.failed("10.0.0.1") for _ in range(12)]
    assert delays[:FREE_FAILURES] == [0.0] * FREE_FAILURES
    growing = delays[FREE_FAILURES:]
    assert growing == sorted(growing) and growing[0] > 0 and growing[-1] == MAX_DELAY
    assert brake.failed("10.0.0.2") == 0.0  # another address is not slowed


def test_success_clears_the_count():
    brake = GuessingBrake()
    for _ in range(FREE_FAILURES + 2):
        brake.failed("10.0.0.1")
    brake.succeeded("10.0.0.1")
    assert brake.failed("10.0.0.1") == 0.0


def test_the_table_stays_bounded():
    brake = GuessingBrake()
    for i in range(MAX_CLIENTS + 50):
        brake.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(brake._failures) == MAX_CLIENTS


def test_the_407_for_a_guesser_is_held_back():
    reactor = MemoryReactorClock()
    doc = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []},
           "authentication": {"enabled": True, "realm": "corp", "exempt_networks": []}}
    policy = policy_from_document(doc, 1)
    factory = ProxyFactory(reactor=reactor, limits=Limits(), node_name="unit", current_policy=lambda: policy,
                           record_sink=lambda r: None, resolver=Resolver(reactor))
    for _ in range(FREE_FAILURES):
        factory.guessing.failed("10.1.2.3")
    proto = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    proto.makeConnection(transport)
    token = base64.b64encode(b"mallory:guess")
    proto.dataReceived(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: Basic " + token + b"\r\n\r\n")
    proto._verified(None, proto.ctx)  # what the worker thread answers for a wrong password
    assert transport.value() == b""
    reactor.advance(MAX_DELAY)
    assert transport.value().startswith(b"HTTP/1.1 407 ")
