"""What a request read from an inspected tunnel is about: its target and its Host, checked
against the tunnel (pure parts of proxy/intercept/session.py)."""

from __future__ import annotations

import pytest

from safesquid_tw.proxy import http1
from safesquid_tw.proxy.intercept.session import TlsSession, is_ip


def head(target: bytes, host: bytes | None, method: bytes = b"GET") -> http1.RequestHead:
    raw = method + b" " + target + b" HTTP/1.1\r\n" + (b"Host: " + host + b"\r\n" if host else b"") + b"\r\n"
    return http1.parse_request_head(raw, 100)


def session(host: str = "www.example.com", port: int = 443) -> TlsSession:
    return TlsSession(None, host, port, connect_ctx=None, identity=None)


@pytest.mark.parametrize("host, port, target, host_header, url", [
    ("www.example.com", 443, b"/a?b=1", b"www.example.com", "https://www.example.com/a?b=1"),
    ("www.example.com", 443, b"/", b"WWW.Example.COM:443", "https://www.example.com/"),
    ("api.example.com", 8443, b"/v1", b"api.example.com:8443", "https://api.example.com:8443/v1"),
    ("www.example.com", 443, b"https://www.example.com/abs", b"www.example.com", "https://www.example.com/abs"),
    ("192.0.2.7", 443, b"/ip", b"192.0.2.7", "https://192.0.2.7/ip"),
])
def test_targets_inside_the_tunnel(host, port, target, host_header, url):
    t = session(host, port).target_for(head(target, host_header))
    assert t.scheme == "https" and t.host == host and t.port == port
    assert t.url_for_log() == url


@pytest.mark.parametrize("target, host_header, status", [
    (b"/", b"other.example", 421),  # domain fronting: the tunnel was decided for another host
    (b"/", b"www.example.com:8443", 421),
    (b"https://other.example/x", b"other.example", 421),
    (b"http://www.example.com/x", b"www.example.com", 421),  # plain http inside TLS
    (b"/", b"bad host", 400),
])
def test_misdirected_or_bad_requests(target, host_header, status):
    with pytest.raises(http1.ProtocolError) as info:
        session().target_for(head(target, host_header))
    assert info.value.status == status


def test_connect_inside_a_tunnel_is_refused():
    with pytest.raises(http1.ProtocolError) as info:
        session().target_for(head(b"other.example:443", b"other.example:443", method=b"CONNECT"))
    assert info.value.status == 400


@pytest.mark.parametrize("host, expected", [
    ("192.0.2.1", True), ("2001:db8::1", True), ("::1", True), ("::ffff:192.0.2.1", True),
    ("example.com", False), ("example.com.", False), ("host1", False), ("1.example", False),
    ("192.0.2.300", False), ("192.0.2.1.", False), ("fe80::1%eth0", True), ("", False),
])
def test_is_ip(host, expected):
    assert is_ip(host) is expected


@pytest.mark.parametrize("port, host_header", [(443, b"[2001:db8::1]"), (8443, b"[2001:db8::1]:8443")])
def test_ipv6_tunnels_take_their_own_host_field(port, host_header):
    t = session("2001:db8::1", port).target_for(head(b"/v6", host_header))
    assert t.host == "2001:db8::1" and t.port == port
