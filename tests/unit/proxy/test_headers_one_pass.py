"""The one-pass field filters agree with strip_hop_by_hop / connection_tokens on every head."""

from __future__ import annotations

import itertools

import pytest

from safesquid_tw.proxy import http1
from safesquid_tw.proxy.headers import (
    connection_options, connection_tokens, names_not_forwarded, strip_hop_by_hop,
)

_FIELDS = [
    (b"Host", b"example.com"),
    (b"Connection", b"keep-alive"),
    (b"Connection", b"close, X-Secret"),
    (b"connection", b" Upgrade ,  Host, Content-Length,,"),
    (b"X-Secret", b"1"),
    (b"Upgrade", b"websocket"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Authorization", b"Basic eDp5"),
    (b"Content-Length", b"0"),
    (b"TE", b"trailers"),
    (b"Accept", b"*/*"),
]


def _heads():
    for count in range(0, 4):
        for combo in itertools.combinations(_FIELDS, count):
            raw = b"GET / HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in combo) + b"\r\n"
            yield http1.parse_request_head(raw)


@pytest.mark.parametrize("keep_upgrade", [False, True])
def test_names_not_forwarded_drops_what_strip_hop_by_hop_drops(keep_upgrade):
    for head in _heads():
        drop = names_not_forwarded(head.values(b"connection"), keep_upgrade=keep_upgrade)
        one_pass = [(n, v) for n, v in head.headers if n.lower() not in drop]
        assert one_pass == strip_hop_by_hop(head.headers, keep_upgrade=keep_upgrade), head


def test_also_adds_the_callers_own_names():
    head = http1.parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n")
    drop = names_not_forwarded(head.values(b"connection"), also=frozenset({b"content-length"}))
    assert [(n, v) for n, v in head.headers if n.lower() not in drop] == [(b"Host", b"a"), (b"X-A", b"1")]


def test_connection_options_match_connection_tokens():
    for head in _heads():
        assert connection_options(head.values(b"connection")) == connection_tokens(head.headers)


def test_values_is_none_for_an_absent_field():
    head = http1.parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.values(b"connection") is None
    assert head.values(b"host") == [b"a"]


def test_one_connection_value_answers_the_same_from_the_cache():
    from safesquid_tw.proxy import headers

    headers._OPTIONS_OF.clear()
    headers._DROP_OF.clear()
    for value in [b"keep-alive", b"Keep-Alive, X-Secret", b"close", b" , ", b"upgrade, x"]:
        for keep_upgrade in (False, True):
            first = headers.names_not_forwarded([value], keep_upgrade=keep_upgrade)
            again = headers.names_not_forwarded([value], keep_upgrade=keep_upgrade)
            by_tuple = headers.names_not_forwarded((value,), keep_upgrade=keep_upgrade)  # not cached
            assert first == again == by_tuple
        assert headers.connection_options([value]) == headers.connection_options([value]) \
            == headers.connection_options((value,))
    assert headers.names_not_forwarded([b"X-Secret"]) >= {b"x-secret", b"connection"}
    for i in range(600):  # bounded
        headers.names_not_forwarded([b"x-%d" % i])
        headers.connection_options([b"x-%d" % i])
    assert len(headers._OPTIONS_OF) <= 256 and len(headers._DROP_OF) <= 256
