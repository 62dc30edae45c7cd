"""The proxy's front door driven over a StringTransport with a fake clock: no sockets, no sleeps.

Requests the proxy answers itself (errors, blocks, 407, OPTIONS, TRACE) never need an origin, so
these tests see the whole connection: what is written back and whether the connection closes.
"""

from __future__ import annotations

import base64
import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory

POLICY = {
    "format": "safesquid-policy/1",
    "access": {
        "default_action": "allow",
        "rules": [{"name": "no-games", "action": "deny", "reason": "games are blocked", "domains": ["*.games.test"]}],
    },
}


def make(policy_doc=POLICY, **limits):
    reactor = MemoryReactorClock()
    policy = policy_from_document(policy_doc, 7) if policy_doc is not None else None
    records = []
    factory = ProxyFactory(
        reactor=reactor,
        limits=Limits(**limits),
        node_name="unit",
        current_policy=lambda: policy,
        record_sink=records.append,
        resolver=Resolver(reactor),
    )
    proto = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
    proto.makeConnection(transport)
    return reactor, proto, transport, records


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 400),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET http://a.test/ HTTP/1.1\nHost: a.test\n\n", 400),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", 400),
        (b"GET http://a.test/ HTTP/1.1\r\n\r\n", 400),
        (b"GET /relative HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),
        (b"GET http://a.test/ HTTP/2.0\r\nHost: a.test\r\n\r\n", 505),
        (b"GET http://a.test/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n", 414),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n", 431),
        (b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999\r\n\r\n", 413),
        (b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nExpect: teapot\r\n\r\n", 417),
    ],
)
def test_bad_requests_get_a_status_and_the_connection_closes(raw, status):
    _reactor, proto, transport, _records = make()
    proto.dataReceived(raw)
    written = transport.value()
    assert status_of(written) == status
    assert b"Connection: close" in written
    assert transport.disconnecting


def test_a_slow_head_is_cut_off_at_the_deadline():
    reactor, proto, transport, _ = make(head_timeout=5.0)
    proto.dataReceived(b"GET http://a.test/ HTTP/1.1\r\n")
    for _ in range(4):
        reactor.advance(1.0)
        proto.dataReceived(b"X: y\r\n")  # trickling bytes does not extend the deadline
    assert not transport.disconnecting
    reactor.advance(1.01)
    assert status_of(transport.value()) == 408 and transport.disconnecting


def test_an_idle_keepalive_connection_is_closed():
    reactor, proto, transport, _ = make(idle_timeout=30.0)
    # A first request (answered by the proxy itself) makes it a keep-alive connection; a
    # connection that never sent a byte has the shorter first-byte deadline instead.
    proto.dataReceived(b"GET http://x.games.test/ HTTP/1.1\r\nHost: x.games.test\r\n\r\n")
    transport.clear()
    reactor.advance(29.9)
    assert not transport.disconnecting
    reactor.advance(0.2)
    assert transport.disconnecting and transport.value() == b""


def test_pipelined_requests_are_answered_in_order():
    _reactor, proto, transport, records = make()
    proto.dataReceived(
        b"GET http://x.games.test/1 HTTP/1.1\r\nHost: x.games.test\r\n\r\n"
        b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n"
        b"GET http://y.games.test/2 HTTP/1.1\r\nHost: y.games.test\r\n\r\n"
    )
    written = transport.value()
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", written)]
    assert statuses == [403, 200, 403]
    assert written.index(b"x.games.test/1") < written.index(b"y.games.test/2")
    assert [r.url for r in records] == ["http://x.games.test/1", "http://y.games.test/2"]
    assert all(r.rule == "no-games" and r.policy_version == 7 for r in records)
    assert not transport.disconnecting


def test_the_block_page_names_the_rule_and_reason_and_escapes_the_url():
    _reactor, proto, transport, _ = make()
    proto.dataReceived(b"GET http://a.games.test/<script>x</script> HTTP/1.1\r\nHost: a.games.test\r\n\r\n")
    written = transport.value()
    assert status_of(written) == 403
    assert b"no-games" in written and b"games are blocked" in written
    assert b"<script>x</script>" not in written


def test_trace_at_max_forwards_zero_is_answered_here_without_credentials():
    _reactor, proto, transport, _ = make()
    proto.dataReceived(
        b"TRACE http://a.test/t HTTP/1.1\r\nHost: a.test\r\nMax-Forwards: 0\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\nX-Seen: yes\r\n\r\n"
    )
    written = transport.value()
    assert status_of(written) == 200 and b"message/http" in written
    assert b"X-Seen: yes" in written and b"c2VjcmV0" not in written


def test_no_policy_means_503():
    _reactor, proto, transport, _ = make(policy_doc=None)
    proto.dataReceived(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert status_of(transport.value()) == 503


def test_a_loop_through_this_proxy_is_refused():
    _reactor, proto, transport, _ = make()
    proto.dataReceived(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nVia: 1.1 other, 1.1 unit\r\n\r\n")
    assert status_of(transport.value()) == 508


def test_proxy_authentication_is_asked_for():
    doc = dict(POLICY, authentication={"enabled": True, "realm": "corp", "exempt_networks": ["127.0.0.0/8"]})
    _reactor, proto, transport, records = make(policy_doc=doc)
    proto.dataReceived(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n")
    written = transport.value()
    assert status_of(written) == 407
    assert b'Proxy-Authenticate: Basic realm="corp"' in written
    assert records[-1].action == "auth"


def test_unknown_credentials_are_checked_off_the_reactor_thread():
    doc = dict(POLICY, authentication={"enabled": True, "realm": "corp", "exempt_networks": []})
    _reactor, proto, transport, _ = make(policy_doc=doc)
    token = base64.b64encode(b"mallory:guess")
    proto.dataReceived(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nProxy-Authorization: Basic " + token + b"\r\n\r\n")
    # The argon2 check went to the worker pool (not started here): nothing answered yet, and
    # the connection stopped reading meanwhile.
    assert transport.value() == b""
    assert proto.gate.paused


def test_answers_of_the_proxy_carry_a_date():
    _reactor, proto, transport, _ = make()
    proto.dataReceived(b"GET http://a.games.test/ HTTP/1.1\r\nHost: a.games.test\r\n\r\n")
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n", transport.value())
