"""PROXY protocol headers and the `haproxy:` listener's wrapper, without sockets."""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.proxy.proxyheader import (
    ProxyHeaderError,
    ProxyHeaderFactory,
    parse_networks,
    parse_proxy_header,
    split_endpoint,
)
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
POLICY = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": [
    {"name": "no-nine", "action": "deny", "clients": ["192.0.2.9/32"]},
    {"name": "no-blocked", "action": "deny", "domains": ["blocked.test"]}]}}
REQUEST = b"GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n"


def v2(command: int = 1, family: int = 0x11, addresses: bytes | None = None, tlv: bytes = b"") -> bytes:
    if addresses is None:
        addresses = socket.inet_aton("192.0.2.9") + socket.inet_aton("198.51.100.1") + struct.pack("!HH", 40000, 3128)
    body = addresses + tlv
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


# -- the parser --------------------------------------------------------------------------------

@pytest.mark.parametrize("data, source", [
    (b"PROXY TCP4 192.0.2.9 198.51.100.1 40000 3128\r\n", ("192.0.2.9", 40000)),
    (b"PROXY TCP6 2001:db8::9 2001:db8::1 40000 3128\r\n", ("2001:db8::9", 40000)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (v2(), ("192.0.2.9", 40000)),
    (v2(tlv=b"\x04\x00\x03abc"), ("192.0.2.9", 40000)),  # TLVs after the addresses are skipped
    (v2(family=0x21, addresses=socket.inet_pton(socket.AF_INET6, "2001:db8::9") * 2 + struct.pack("!HH", 1, 2)),
     ("2001:db8::9", 1)),
    (v2(command=0, family=0x00, addresses=b""), None),  # LOCAL: HAProxy's own health checks
    (v2(command=0), None),  # LOCAL with addresses: they are ignored
    (v2(family=0x00, addresses=b""), None),  # PROXY with AF_UNSPEC
], ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v1-unknown-with-addresses", "v2-tcp4", "v2-tlv", "v2-tcp6",
        "v2-local", "v2-local-addresses", "v2-unspec"])
def test_valid_headers(data, source):
    header = parse_proxy_header(data + b"GET / HTTP/1.1\r\n")
    assert header is not None and header.size == len(data) and header.source == source


@pytest.mark.parametrize("data", [
    b"GET http://a.test/ HTTP/1.1\r\n\r\n",  # no header at all: a client straight to the listener
    b"PROXY TCP4 garbage 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",  # family and address disagree
    b"PROXY TCP4 192.0.2.9 198.51.100.1 x 2\r\n",
    b"PROXY TCP4 192.0.2.9 198.51.100.1 70000 2\r\n",
    b"PROXY TCP4 192.0.2.9 198.51.100.1 01 2\r\n",
    b"PROXY TCP4 192.0.2.9 198.51.100.1 1\r\n",
    b"PROXY UDP4 192.0.2.9 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.9 198.51.100.1 1 2\n",  # LF alone
    b"PROXY " + b"A" * 120,  # no CRLF within 107 bytes
    SIG + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a version 2 signature
    SIG + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # unknown command
    v2(family=0x12),  # UDP
    v2(addresses=b"\x01\x02\x03"),  # too short for TCP4
    SIG + b"\x21\x11\xff\xff",  # longer than any header needs to be
], ids=["http", "v1-garbage-address", "v1-family-mismatch", "v1-port-text", "v1-port-big", "v1-port-zero",
        "v1-fields-missing", "v1-udp", "v1-lf", "v1-no-crlf", "v2-version", "v2-command", "v2-udp",
        "v2-short", "v2-huge"])
def test_malformed_headers_are_refused(data):
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


@pytest.mark.parametrize("whole", [b"PROXY TCP4 192.0.2.9 198.51.100.1 40000 3128\r\n", v2()])
def test_a_header_split_anywhere_waits_for_the_rest(whole):
    for cut in range(1, len(whole)):
        assert parse_proxy_header(whole[:cut]) is None, cut
    assert parse_proxy_header(whole).source == ("192.0.2.9", 40000)


def test_endpoints_and_networks():
    assert split_endpoint("haproxy:tcp:3128:interface=127.0.0.2") == (True, "tcp:3128:interface=127.0.0.2")
    assert split_endpoint("tcp:3128") == (False, "tcp:3128")
    allowed = parse_networks("10.0.0.0/8, 127.0.0.1")
    assert "10.9.9.9" in allowed and "127.0.0.1" in allowed and "127.0.0.2" not in allowed
    for bad in ("", "10.0.0.0/33", "ten"):
        with pytest.raises(ValueError):
            parse_networks(bad)


# -- the wrapper on a fake transport -------------------------------------------------------------

def listener(allowed: str | None = None, **limits):
    reactor = MemoryReactorClock()
    records = []
    policy = policy_from_document(POLICY, 1)
    proxy = ProxyFactory(reactor=reactor, limits=Limits(**limits), node_name="unit", current_policy=lambda: policy,
                         record_sink=records.append, resolver=Resolver(reactor))
    wrapper = ProxyHeaderFactory(proxy, reactor=reactor, timeout=proxy.limits.first_byte_timeout,
                                 allowed=parse_networks(allowed) if allowed else None)
    return reactor, proxy, wrapper, records


def connect(wrapper, peer: str = "127.0.0.10"):
    address = IPv4Address("TCP", peer, 50000)
    proto = wrapper.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport


def test_the_header_source_is_the_client_for_rules_and_records():
    _reactor, proxy, wrapper, records = listener()
    proto, transport = connect(wrapper)
    assert not proxy.connections, "nothing is served before the header"
    proto.dataReceived(b"PROXY TCP4 192.0.2.9 198.51.100.1 40000 3128\r\n" + REQUEST)
    assert transport.value().startswith(b"HTTP/1.1 403")
    assert records[-1].client == "192.0.2.9" and records[-1].rule == "no-nine"
    assert proto.getPeer().host == "192.0.2.9"
    assert proxy.per_client == {"192.0.2.9": 1}


def test_local_is_served_as_the_balancers_own_address():
    _reactor, proxy, wrapper, records = listener()
    proto, transport = connect(wrapper, "127.0.0.10")
    proto.dataReceived(v2(command=0, family=0, addresses=b"") + REQUEST)
    assert transport.value().startswith(b"HTTP/1.1 403")
    assert records[-1].client == "127.0.0.10" and records[-1].rule == "no-blocked"


@pytest.mark.parametrize("data", [REQUEST, b"PROXY TCP4 bogus\r\n", v2(family=0x12)])
def test_a_missing_or_malformed_header_is_closed_unanswered_and_counted(data):
    _reactor, proxy, wrapper, records = listener()
    proto, transport = connect(wrapper)
    proto.dataReceived(data)
    assert transport.value() == b"" and transport.disconnecting
    assert proxy.proxy_header_invalid == 1 and not records and not proxy.connections


def test_a_header_that_never_comes_is_closed_at_the_first_byte_deadline():
    reactor, proxy, wrapper, _ = listener(first_byte_timeout=3.0)
    proto, transport = connect(wrapper)
    proto.dataReceived(b"PROXY TCP4 192.0.2.9")
    reactor.advance(2.9)
    assert not transport.disconnecting
    reactor.advance(0.2)
    assert transport.disconnecting and transport.value() == b"" and proxy.proxy_header_invalid == 1


def test_peers_outside_proxy_protocol_from_are_closed_and_counted():
    _reactor, proxy, wrapper, records = listener(allowed="127.0.0.10/32")
    proto, transport = connect(wrapper, "127.0.0.11")
    assert transport.disconnecting and proxy.proxy_peer_refused == 1
    proto.dataReceived(b"PROXY TCP4 192.0.2.9 198.51.100.1 40000 3128\r\n" + REQUEST)
    assert transport.value() == b"" and not records
    proto, transport = connect(wrapper, "127.0.0.10")
    proto.dataReceived(b"PROXY TCP4 192.0.2.9 198.51.100.1 40000 3128\r\n" + REQUEST)
    assert records[-1].client == "192.0.2.9"


def test_half_closes_reach_a_protocol_that_takes_them():
    from twisted.internet import protocol
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from zope.interface import implementer

    events = []

    @implementer(IHalfCloseableProtocol)
    class HalfCloser(protocol.Protocol):
        def readConnectionLost(self):
            events.append("read")

        def writeConnectionLost(self):
            events.append("write")

    class Plain(protocol.Protocol):
        pass

    for inner_class, provides in ((HalfCloser, True), (Plain, False)):
        wrapper = ProxyHeaderFactory(protocol.Factory.forProtocol(inner_class), reactor=MemoryReactorClock(),
                                     timeout=10.0, allowed=None)
        proto, _transport = connect(wrapper)
        assert not IHalfCloseableProtocol.providedBy(proto), "not before the header"
        proto.dataReceived(v2())
        assert IHalfCloseableProtocol.providedBy(proto) is provides
    half = ProxyHeaderFactory(protocol.Factory.forProtocol(HalfCloser), reactor=MemoryReactorClock(), timeout=10.0,
                              allowed=None)
    proto, _transport = connect(half)
    proto.dataReceived(v2())
    proto.readConnectionLost()
    proto.writeConnectionLost()
    assert events == ["read", "write"]
