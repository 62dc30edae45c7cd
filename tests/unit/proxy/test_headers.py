"""Tables for hop-by-hop header handling."""

from __future__ import annotations

import pytest

from safesquid_tw.proxy.headers import (
    HOP_BY_HOP, append_via, client_wants_close, connection_tokens, is_valid_pseudonym,
    strip_hop_by_hop, via_contains,
)


def test_hop_by_hop_set():
    assert HOP_BY_HOP == {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
    }


@pytest.mark.parametrize("headers, expected", [
    ([], set()),
    ([(b"Connection", b"close")], {b"close"}),
    ([(b"connection", b" Keep-Alive , X-Foo ,,")], {b"keep-alive", b"x-foo"}),
    ([(b"CONNECTION", b"upgrade"), (b"Host", b"a"), (b"Connection", b"TE")], {b"upgrade", b"te"}),
    ([(b"Connections", b"close"), (b"X-Connection", b"close")], set()),
])
def test_connection_tokens(headers, expected):
    assert connection_tokens(headers) == expected


@pytest.mark.parametrize("headers, keep_upgrade, expected", [
    ([(b"Host", b"a"), (b"Accept", b"*/*")], False, [(b"Host", b"a"), (b"Accept", b"*/*")]),
    ([(b"Host", b"a"), (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
      (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"), (b"Trailer", b"X"),
      (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"websocket"),
      (b"Proxy-Authorization", b"Basic eDp5"), (b"Proxy-Authenticate", b"Basic"),
      (b"Accept", b"*/*")], False, [(b"Host", b"a"), (b"Accept", b"*/*")]),
    # fields nominated by Connection go too, in any case
    ([(b"Connection", b"X-Secret, close"), (b"x-secret", b"1"), (b"X-Other", b"2")], False,
     [(b"X-Other", b"2")]),
    ([(b"Connection", b"x-a"), (b"Connection", b"X-B"), (b"X-A", b"1"), (b"X-B", b"2"),
      (b"X-C", b"3")], False, [(b"X-C", b"3")]),
    # Host and Content-Length cannot be nominated away
    ([(b"Connection", b"host, content-length, cookie"), (b"Host", b"a"),
      (b"Content-Length", b"3"), (b"Cookie", b"c")], False,
     [(b"Host", b"a"), (b"Content-Length", b"3")]),
    # keep_upgrade keeps Upgrade even when Connection names it
    ([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Host", b"a")], True,
     [(b"Upgrade", b"websocket"), (b"Host", b"a")]),
    ([(b"Connection", b"Upgrade, X-A"), (b"Upgrade", b"websocket"), (b"X-A", b"1"),
      (b"Keep-Alive", b"5")], True, [(b"Upgrade", b"websocket")]),
])
def test_strip_hop_by_hop(headers, keep_upgrade, expected):
    assert strip_hop_by_hop(headers, keep_upgrade=keep_upgrade) == expected
    assert strip_hop_by_hop(iter(headers), keep_upgrade=keep_upgrade) == expected


@pytest.mark.parametrize("version, headers, expected", [
    (b"HTTP/1.1", [], False),
    (b"HTTP/1.1", [(b"Connection", b"close")], True),
    (b"HTTP/1.1", [(b"Connection", b"Keep-Alive, Close")], True),
    (b"HTTP/1.1", [(b"Connection", b"keep-alive")], False),
    (b"HTTP/1.1", [(b"Connection", b"closed")], False),
    (b"HTTP/1.0", [], True),
    (b"HTTP/1.0", [(b"Connection", b"Keep-Alive")], False),
    (b"HTTP/1.0", [(b"Connection", b"keep-alive, close")], True),
    (b"HTTP/1.0", [(b"Keep-Alive", b"300")], True),
])
def test_client_wants_close(version, headers, expected):
    assert client_wants_close(version, headers) is expected


@pytest.mark.parametrize("headers, version, expected", [
    ([(b"Host", b"a")], b"HTTP/1.1", [(b"Host", b"a"), (b"Via", b"1.1 gw")]),
    ([(b"Host", b"a")], b"HTTP/1.0", [(b"Host", b"a"), (b"Via", b"1.0 gw")]),
    ([(b"via", b"1.0 fred, 1.1 p.example.net"), (b"Host", b"a")], b"HTTP/1.1",
     [(b"via", b"1.0 fred, 1.1 p.example.net, 1.1 gw"), (b"Host", b"a")]),
    ([(b"Via", b"1.0 a"), (b"Via", b"1.1 b")], b"HTTP/1.1",
     [(b"Via", b"1.0 a"), (b"Via", b"1.1 b, 1.1 gw")]),
    ([(b"Via", b"")], b"HTTP/1.1", [(b"Via", b"1.1 gw")]),
])
def test_append_via(headers, version, expected):
    original = list(headers)
    assert append_via(headers, version, b"gw") == expected
    assert headers == original


@pytest.mark.parametrize("headers, expected", [
    ([], False),
    ([(b"Via", b"1.1 gw")], True),
    ([(b"VIA", b"1.0 fred, 1.1 GW (safesquid)")], True),
    ([(b"Via", b"1.0 fred"), (b"Via", b"HTTP/1.1 gw")], True),
    ([(b"Via", b"1.1 gw2, 1.1 xgw")], False),
    ([(b"Via", b"gw")], False),                       # no protocol: "gw" is not a received-by
    ([(b"X-Via", b"1.1 gw")], False),
])
def test_via_contains(headers, expected):
    assert via_contains(headers, b"gw") is expected


def test_via_round_trip_detects_loop():
    once = append_via([(b"Host", b"a")], b"HTTP/1.1", b"gw-1")
    assert via_contains(once, b"gw-1")
    assert not via_contains(once, b"gw-2")


@pytest.mark.parametrize("pseudonym, valid", [
    (b"gw", True), (b"proxy.example.net:3128", True), (b"[::1]:3128", True),
    (b"", False), (b"two words", False), (b"a,b", False), (b"a\r\nX: y", False),
])
def test_is_valid_pseudonym(pseudonym, valid):
    assert is_valid_pseudonym(pseudonym) is valid
