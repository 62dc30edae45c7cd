"""The lean path against the general one, over memory transports: for many requests and
responses both must send exactly the same bytes upstream and to the client, write the same access
record, and keep the connections in the same state; anything unusual must take the general path."""

from __future__ import annotations

import itertools

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from safesquid_tw.config import Limits
from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.proxy import leanpath
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.service import ProxyFactory
from safesquid_tw.proxy.upstream import UpstreamConnection

ORIGIN = ("http", "origin.test", 80)


def policy_doc(mode: str = "append", trusted=None) -> dict:
    forwarding = {"x_forwarded_for": mode}
    if trusted:
        forwarding["trusted_downstream"] = trusted
    return {
        "format": "safesquid-policy/1",
        "access": {
            "default_action": "allow",
            "rules": [
                {"name": "no-games", "action": "deny", "reason": "games are blocked", "domains": ["*.games.test"]},
                {"name": "news", "action": "allow", "domains": ["news.test"], "url_patterns": ["*/a*"]},
            ],
        },
        "forwarding": forwarding,
    }


class ClientTransport(StringTransport):
    """Like a TCP transport, removing a producer when none is registered does nothing."""

    def unregisterProducer(self):
        self.producer = None
        self.streaming = None


class Node:
    """A client connection and one pooled origin connection, both on StringTransports."""

    def __init__(self, doc: dict, *, lean: bool, monkeypatch) -> None:
        self.reactor = MemoryReactorClock()
        policy = policy_from_document(doc, 3)
        self.records = []
        self.factory = ProxyFactory(reactor=self.reactor, limits=Limits(), node_name="unit",
                                    current_policy=lambda: policy, record_sink=self.records.append,
                                    resolver=Resolver(self.reactor))
        if not lean:
            monkeypatch.setattr(leanpath, "request_head", lambda conn, ctx: None)
            monkeypatch.setattr(leanpath, "response_head", lambda exchange, head, framing: None)
        self.client = self.factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
        self.client_transport = ClientTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        self.client.makeConnection(self.client_transport)
        self.origin_transport = StringTransport()
        self.origin_transport.connected = True
        self.origin = UpstreamConnection(self.factory.pool, ORIGIN, "192.0.2.1:80")
        self.origin.makeConnection(self.origin_transport)
        self.factory.pool.release(self.origin)

    def exchange(self, request: bytes, response_parts: list[bytes]) -> tuple[bytes, bytes, list]:
        """(bytes sent upstream, bytes sent to the client, producers seen on the client side)."""
        self.client.dataReceived(request)
        upstream = self.origin_transport.value()
        self.origin_transport.clear()
        producers = []
        for part in response_parts:
            self.origin.dataReceived(part)
            producers.append(self.client_transport.producer is not None)
        client = self.client_transport.value()
        self.client_transport.clear()
        return upstream, client, producers


def _record_view(record) -> dict:
    fields = dict(record.__dict__) if hasattr(record, "__dict__") else {
        name: getattr(record, name) for name in record.__slots__ if not name.startswith("__")}
    fields.pop("time", None)
    fields.pop("duration_ms", None)
    return fields


def both(monkeypatch, doc, request, response_parts):
    """Run the same exchange through a lean and a general node; return both outcomes."""
    outcomes = []
    for lean in (True, False):
        with monkeypatch.context() as patch:
            node = Node(doc, lean=lean, monkeypatch=patch)
            upstream, client, producers = node.exchange(request, response_parts)
            outcomes.append((upstream, client, producers, [_record_view(r) for r in node.records],
                             node.client.state, node.client_transport.disconnecting,
                             node.origin._state, node.factory.pool.idle_count))
    return outcomes


OK_100 = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 15:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
          b"ETag: \"x\"\r\n\r\nhello")
REQUEST_HEADS = [
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\n\r\n",
    b"GET http://origin.test/a?b=c&d HTTP/1.1\r\nHost: origin.test\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"HEAD http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
    b"GET http://origin.test HTTP/1.1\r\nHost: origin.test\r\n\r\n",
    b"GET http://ORIGIN.test:80/%7Euser/../x HTTP/1.1\r\nHost: origin.test\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nConnection: X-Secret, keep-alive\r\n"
    b"X-Secret: 1\r\nX-Kept: 2\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
    b"Proxy-Authorization: Basic eDp5\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nX_Forwarded_For: 6.6.6.6\r\nRemote_User: root\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nhost: origin.test\r\nCookie: a=b; c=d\r\nCookie: e=f\r\n"
    b"Accept-Encoding: gzip\r\n\r\n",
    b"GET http://news.test/a HTTP/1.1\r\nHost: news.test\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.0\r\nHost: origin.test\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.0\r\nHost: origin.test\r\nConnection: keep-alive\r\n\r\n",
    # General path only (the lean one declines them): the answers must not change either.
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nVia: 1.1 elsewhere\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nMax-Forwards: 3\r\n\r\n",
    b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    b"OPTIONS http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\n\r\n",
]
RESPONSES = [
    [OK_100],
    [OK_100[:40], OK_100[40:]],  # the head in two reads
    [OK_100[:-3], OK_100[-3:]],  # the body in two reads: the origin is a producer meanwhile
    [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nETag: \"y\"\r\n\r\n"],
    [b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"],
    [b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: Foo\r\nFoo: bar\r\nKeep-Alive: timeout=5\r\n"
     b"Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\n\r\nok"],
    [b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nVia: 1.0 cache\r\nContent-Length: 2\r\n\r\nok"],
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
    [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
]


@pytest.mark.parametrize("request_head, response", list(itertools.product(REQUEST_HEADS, RESPONSES)))
def test_lean_and_general_paths_send_the_same_bytes_and_records(monkeypatch, request_head, response):
    lean, general = both(monkeypatch, policy_doc(), request_head, response)
    assert lean == general


@pytest.mark.parametrize("mode", ["append", "replace", "delete", "transparent"])
def test_every_forwarding_mode_gives_the_same_upstream_head(monkeypatch, mode):
    for request_head in REQUEST_HEADS:
        lean, general = both(monkeypatch, policy_doc(mode, trusted=["10.0.0.0/8"]), request_head, [OK_100])
        assert lean == general


def test_the_common_request_does_take_the_lean_path(monkeypatch):
    taken = []
    original_request, original_response = leanpath.request_head, leanpath.response_head
    monkeypatch.setattr(leanpath, "request_head", lambda *a: taken.append("request") or original_request(*a))
    monkeypatch.setattr(leanpath, "response_head", lambda *a: taken.append("response") or original_response(*a))
    node = Node(policy_doc(), lean=True, monkeypatch=monkeypatch)
    upstream, client, producers = node.exchange(REQUEST_HEADS[0], [OK_100])
    assert taken == ["request", "response"]
    assert upstream == (b"GET /a HTTP/1.1\r\nHost: origin.test\r\nX-Forwarded-For: 10.1.2.3\r\n"
                        b"Via: 1.1 unit\r\n\r\n")
    assert client == (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 15:00:00 GMT\r\n"
                      b"Content-Type: text/plain\r\nETag: \"x\"\r\nVia: 1.1 unit\r\nContent-Length: 5\r\n\r\nhello")
    assert producers == [False]  # the whole body came with the head: nothing to pause
    assert [r.status for r in node.records] == [200]
    assert node.factory.pool.idle_count == 1 and node.client.state == "head"


def test_a_body_still_arriving_keeps_back_pressure_on_the_origin(monkeypatch):
    node = Node(policy_doc(), lean=True, monkeypatch=monkeypatch)
    _upstream, _client, producers = node.exchange(REQUEST_HEADS[0], [OK_100[:-3], OK_100[-3:]])
    assert producers == [True, False]  # registered while the body was incomplete, then removed


def test_keepalive_requests_in_a_row_reuse_the_pooled_origin(monkeypatch):
    node = Node(policy_doc(), lean=True, monkeypatch=monkeypatch)
    for _ in range(5):
        _upstream, client, _producers = node.exchange(REQUEST_HEADS[0], [OK_100])
        assert client.endswith(b"hello")
    assert len(node.records) == 5 and node.factory.pool.connections_made == 0
    assert node.origin._state == "idle" and node.factory.pool.idle_count == 1


def test_a_value_that_would_split_the_head_is_refused():
    with pytest.raises(ValueError):
        leanpath._checked([b"GET / HTTP/1.1\r\n", b"X: a\r\nInjected: b\r\n", b"\r\n"], 3)


def test_field_lines_parsed_from_the_cache_are_exactly_those_parsed_anew():
    from safesquid_tw.proxy import http1

    raw = (b"HTTP/1.1 200 OK\r\nServer: nginx  \r\nX-A:\tb\t\r\nx-a: c\r\nContent-Length: 5\r\n\r\n")
    http1._LINE_CACHE.clear()
    first = http1.parse_response_head(raw)
    assert b"Server: nginx  " in http1._LINE_CACHE
    second = http1.parse_response_head(raw)
    assert first == second and first.get_all(b"x-a") == second.get_all(b"x-a") == [b"b", b"c"]
    assert second.headers[0] == (b"Server", b"nginx")
    # A line that fails the syntax is never cached: it fails every time.
    for _ in range(2):
        with pytest.raises(http1.ProtocolError):
            http1.parse_response_head(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n")
    assert b"Bad Name: x" not in http1._LINE_CACHE


def test_the_field_line_cache_stays_bounded():
    from safesquid_tw.proxy import http1

    for i in range(http1._LINE_CACHE_SIZE + 10):
        http1.parse_request_head(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX-N: %d\r\n\r\n" % i)
    assert len(http1._LINE_CACHE) <= http1._LINE_CACHE_SIZE
    http1.parse_request_head(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX-Long: " + b"v" * 300 + b"\r\n\r\n")
    assert not any(len(line) > http1._LINE_CACHE_MAX_LINE for line in http1._LINE_CACHE)


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
@pytest.mark.parametrize("connection", [None, b"close", b"keep-alive", b"Keep-Alive, X", b"x, CLOSE", b""])
def test_the_context_reads_connection_close_as_client_wants_close(version, connection):
    from safesquid_tw.proxy import http1
    from safesquid_tw.proxy.context import RequestContext
    from safesquid_tw.proxy.headers import client_wants_close
    from safesquid_tw.proxy.target import parse_target

    raw = b"GET http://a.test/ " + version + b"\r\nHost: a.test\r\n"
    if connection is not None:
        raw += b"connection: " + connection + b"\r\n"
    head = http1.parse_request_head(raw + b"\r\n")
    ctx = RequestContext(0.0, head, parse_target(b"GET", head.target), None, http1.NO_BODY)
    assert ctx.client_close is client_wants_close(version, head.headers)


def test_parsed_heads_carry_each_field_as_forwarded_cached_or_not():
    from safesquid_tw.proxy import http1

    raw = (b"HTTP/1.1 200 OK\r\nServer: nginx  \r\nX-A:\tb\t\r\nx-a: c\r\nX-Long: " + b"v" * 300
           + b"\r\nContent-Length: 5\r\n\r\n")
    http1._LINE_CACHE.clear()
    for _ in range(2):  # parsed anew, then from the cache (the long line never is)
        head = http1.parse_response_head(raw)
        assert head.lines == tuple((n.lower(), n + b": " + v + b"\r\n") for n, v in head.headers)
    request = http1.parse_request_head(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX_Y: 1\r\n\r\n")
    assert request.lines == ((b"host", b"Host: a.test\r\n"), (b"x_y", b"X_Y: 1\r\n"))
    # A head built by hand has none; the lean path then builds the lines from the fields.
    assert http1.RequestHead(b"GET", b"/", b"HTTP/1.1", ((b"Host", b"a"),)).lines is None


def test_heads_reused_from_the_memo_are_those_built_anew(monkeypatch):
    """Every exchange twice on the lean path (the second time its heads come from the memo, the
    field blocks being cached by http1) and once on the general one: the same bytes each time."""
    for doc in (policy_doc(), policy_doc("replace", trusted=["10.0.0.0/8"]), policy_doc("delete")):
        for request_head, response in itertools.product(REQUEST_HEADS, RESPONSES):
            first, general = both(monkeypatch, doc, request_head, response)
            again, _general = both(monkeypatch, doc, request_head, response)
            assert first == general and again == general


def test_the_memo_is_consulted_and_keeps_every_input_apart(monkeypatch):
    leanpath._REQUEST_MEMO.clear()
    leanpath._RESPONSE_MEMO.clear()
    built = []
    checked = leanpath._checked
    monkeypatch.setattr(leanpath, "_checked", lambda *a: built.append(1) or checked(*a))
    node = Node(policy_doc(), lean=True, monkeypatch=monkeypatch)
    upstream, client, _producers = node.exchange(REQUEST_HEADS[0], [OK_100])
    assert len(built) == 2
    assert node.exchange(REQUEST_HEADS[0], [OK_100])[:2] == (upstream, client)
    assert len(built) == 2  # both heads came from the memo
    # The same field blocks with another length, another target: other heads.
    other = node.exchange(REQUEST_HEADS[0].replace(b"/a ", b"/b "), [OK_100.replace(b"5\r\n", b"4\r\n")[:-1]])
    assert other[0].startswith(b"GET /b HTTP/1.1\r\n") and b"Content-Length: 4\r\n" in other[1]
    # A client that asks to close gets Connection: close although the response block is the same.
    closing = node.exchange(REQUEST_HEADS[6], [OK_100])
    assert b"Connection: close\r\n" in closing[1] and node.client_transport.disconnecting


def test_the_memo_stays_bounded():
    leanpath._RESPONSE_MEMO.clear()
    for i in range(leanpath._MEMO_SIZE * 3):
        leanpath._remember(leanpath._RESPONSE_MEMO, (i,), ((i,),))
    assert len(leanpath._RESPONSE_MEMO) <= leanpath._MEMO_SIZE
