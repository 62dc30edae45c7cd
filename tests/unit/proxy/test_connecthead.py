"""CONNECT heads parsed once: the same result as the general parser, the same refusals, no
credentials kept, bounded."""

from __future__ import annotations

import pytest

from safesquid_tw.proxy import connecthead, http1
from safesquid_tw.proxy.connecthead import parse_connect_head

HEAD = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nUser-Agent: t\r\n\r\n"


@pytest.fixture(autouse=True)
def empty_table():
    connecthead.forget_all()
    yield
    connecthead.forget_all()


def test_same_head_as_the_general_parser_and_remembered() -> None:
    first = parse_connect_head(HEAD, 100)
    assert first == http1.parse_request_head(HEAD, 100)
    assert first.get(b"host") == b"example.com:443"
    assert parse_connect_head(HEAD, 100) is first


def test_field_limit_applies_to_a_remembered_head() -> None:
    parse_connect_head(HEAD, 100)
    with pytest.raises(http1.ProtocolError) as caught:
        parse_connect_head(HEAD, 1)
    assert caught.value.status == 431


@pytest.mark.parametrize("raw, status", [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # space before the colon
    (b"CONNECT example.com:443 HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    (b"CONNECT  example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"CONNECT example.com:443 HTTP/1.1\r\n folded\r\n\r\n", 400),
])
def test_refusals_are_the_general_parsers(raw: bytes, status: int) -> None:
    for _ in range(2):
        with pytest.raises(http1.ProtocolError) as caught:
            parse_connect_head(raw, 100)
        assert caught.value.status == status


def test_credentials_are_not_kept() -> None:
    raw = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic YTpi\r\n\r\n"
    head = parse_connect_head(raw, 100)
    assert head.get(b"proxy-authorization") == b"Basic YTpi"
    assert connecthead._HEADS == {}


def test_table_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(connecthead, "_ENTRIES", 4)
    for i in range(20):
        parse_connect_head(b"CONNECT h%d.example:443 HTTP/1.1\r\nHost: h%d.example:443\r\n\r\n" % (i, i), 100)
    assert len(connecthead._HEADS) <= 4
