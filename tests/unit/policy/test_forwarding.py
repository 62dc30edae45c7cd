"""X-Forwarded-For handling (policy section `forwarding`) and the per-client edge limits, no sockets."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.forwarding import client_identity, rewrite
from safesquid_tw.policy.networks import NetworkSet
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory

TRUSTED = NetworkSet(["10.0.0.0/8", "2001:db8:1::/48"])
BASE = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []}}


@pytest.mark.parametrize("peer, xff, expected", [
    ("192.0.2.1", [b"6.6.6.6"], "192.0.2.1"),  # an untrusted client's XFF never changes identity
    ("10.0.0.5", [], "10.0.0.5"),  # a trusted proxy with no XFF is itself the client
    ("10.0.0.5", [b"192.0.2.7"], "192.0.2.7"),
    ("10.0.0.5", [b"6.6.6.6, 192.0.2.7"], "192.0.2.7"),  # right-most untrusted: forged left part ignored
    ("10.0.0.5", [b"6.6.6.6, 192.0.2.7, 10.0.0.9"], "192.0.2.7"),  # trusted hops are skipped
    ("10.0.0.5", [b"6.6.6.6", b"192.0.2.7"], "192.0.2.7"),  # several fields are one list
    ("10.0.0.5", [b"10.1.1.1, 10.2.2.2"], "10.1.1.1"),  # all trusted: the farthest
    ("10.0.0.5", [b"192.0.2.7, garbage"], "10.0.0.5"),  # garbage stops the walk at the last trusted hop
    ("10.0.0.5", [b"192.0.2.7:4711"], "192.0.2.7"),
    ("10.0.0.5", [b"[2001:db8::7]:80"], "2001:db8::7"),
    ("10.0.0.5", [b"2001:db8::7"], "2001:db8::7"),
    ("10.0.0.5", [b"192.0.2.7,,  "], "192.0.2.7"),
    ("2001:db8:1::2", [b"192.0.2.7"], "192.0.2.7"),
])
def test_client_identity(peer, xff, expected):
    assert client_identity(peer, xff, TRUSTED) == expected


def test_client_identity_without_trusted_networks_is_the_peer():
    assert client_identity("10.0.0.5", [b"192.0.2.7"], None) == "10.0.0.5"


HEADERS = [(b"Host", b"a.test"), (b"X-Forwarded-For", b"6.6.6.6"), (b"Forwarded", b"for=6.6.6.6"),
           (b"x-forwarded-for", b"7.7.7.7")]


@pytest.mark.parametrize("mode, expected", [
    ("append", [(b"Host", b"a.test"), (b"Forwarded", b"for=6.6.6.6"), (b"X-Forwarded-For", b"6.6.6.6, 7.7.7.7, 10.0.0.5")]),
    ("replace", [(b"Host", b"a.test"), (b"Forwarded", b"for=6.6.6.6"), (b"X-Forwarded-For", b"192.0.2.7")]),
    ("delete", [(b"Host", b"a.test")]),
    ("transparent", HEADERS),
])
def test_rewrite(mode, expected):
    assert rewrite(list(HEADERS), mode, "10.0.0.5", "192.0.2.7") == expected


def test_append_without_a_client_value_is_the_peer_alone():
    assert rewrite([(b"Host", b"a.test")], "append", "192.0.2.1", "192.0.2.1")[-1] == (b"X-Forwarded-For", b"192.0.2.1")


def test_the_section_is_validated_and_left_out_at_its_defaults():
    assert "forwarding" not in validate_document(dict(BASE, forwarding={}))
    assert "forwarding" not in validate_document(dict(BASE, forwarding={"x_forwarded_for": "append"}))
    doc = validate_document(dict(BASE, forwarding={"x_forwarded_for": "delete", "trusted_downstream": ["10.0.0.0/8"]}))
    assert doc["forwarding"] == {"x_forwarded_for": "delete", "trusted_downstream": ["10.0.0.0/8"]}


@pytest.mark.parametrize("section, path", [
    ({"x_forwarded_for": "strip"}, "forwarding.x_forwarded_for"),
    ({"x_forwarded_for": 1}, "forwarding.x_forwarded_for"),
    ({"trusted_downstream": ["10.0.0.0/33"]}, "forwarding.trusted_downstream[0]"),
    ({"trusted_downstream": ["10.0.0.1", "10.0.0.1/32"]}, "forwarding.trusted_downstream[1]"),
    ({"trusted_downstream": "10.0.0.0/8"}, "forwarding.trusted_downstream"),
    ({"xff": "append"}, "forwarding.xff"),
])
def test_bad_sections_name_the_field(section, path):
    with pytest.raises(PolicyError) as caught:
        validate_document(dict(BASE, forwarding=section))
    assert caught.value.path == path


# -- the front door: identity for rules, per-client limit, first-byte deadline ----------------------

RULES = {"default_action": "allow", "rules": [
    {"name": "no-seven", "action": "deny", "clients": ["192.0.2.7/32"]},
    {"name": "no-blocked", "action": "deny", "domains": ["blocked.test"]}]}


def make(forwarding=None, **limits):
    reactor = MemoryReactorClock()
    document = dict(BASE, access=RULES)
    if forwarding is not None:
        document["forwarding"] = forwarding
    policy = policy_from_document(document, 3)
    records = []
    factory = ProxyFactory(reactor=reactor, limits=Limits(**limits), node_name="unit", current_policy=lambda: policy,
                           record_sink=records.append, resolver=Resolver(reactor))
    return reactor, factory, records


def connect(factory, peer="10.0.0.5"):
    address = IPv4Address("TCP", peer, 5555)
    proto = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport


REQUEST = b"GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\nX-Forwarded-For: 6.6.6.6, 192.0.2.7\r\n\r\n"


def test_a_trusted_downstream_proxys_client_is_the_client_for_rules_and_records():
    _reactor, factory, records = make({"trusted_downstream": ["10.0.0.0/8"]})
    proto, transport = connect(factory)
    proto.dataReceived(REQUEST)
    assert records[-1].client == "192.0.2.7" and records[-1].rule == "no-seven"
    # The connection itself still counts against the downstream proxy's address.
    assert factory.per_client == {"10.0.0.5": 1}


def test_an_untrusted_clients_xff_changes_nothing():
    _reactor, factory, records = make()
    proto, _transport = connect(factory)
    proto.dataReceived(REQUEST)
    assert records[-1].client == "10.0.0.5" and records[-1].rule == "no-blocked"


def test_one_address_over_its_limit_is_closed_at_once_while_another_connects():
    _reactor, factory, _records = make(max_connections_per_client=2)
    first = [connect(factory, "192.0.2.1") for _ in range(2)]
    assert not any(t.disconnecting for _p, t in first)
    _proto, third = connect(factory, "192.0.2.1")
    assert third.disconnecting and third.value() == b"" and factory.per_client_refused == 1
    _proto, other = connect(factory, "192.0.2.2")
    assert not other.disconnecting
    # A closed connection frees its slot.
    proto, transport = first[0]
    proto.connectionLost(None)
    _proto, again = connect(factory, "192.0.2.1")
    assert not again.disconnecting and factory.per_client["192.0.2.1"] == 2


def test_a_silent_connection_is_closed_at_the_first_byte_deadline_not_the_idle_one():
    reactor, factory, _records = make(first_byte_timeout=2.0, idle_timeout=120.0)
    _proto, silent = connect(factory)
    reactor.advance(1.9)
    assert not silent.disconnecting
    reactor.advance(0.2)
    assert silent.disconnecting and silent.value() == b"" and factory.first_byte_timeouts == 1


def test_a_connection_that_spoke_gets_the_idle_deadline():
    reactor, factory, _records = make(first_byte_timeout=2.0, idle_timeout=30.0)
    proto, transport = connect(factory)
    proto.dataReceived(REQUEST)
    reactor.advance(10.0)
    assert not transport.disconnecting
    reactor.advance(20.1)
    assert transport.disconnecting and factory.first_byte_timeouts == 0
