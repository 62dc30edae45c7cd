"""Tables for parsing a forward proxy's request-target."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safesquid_tw.proxy.http1 import ProtocolError
from safesquid_tw.proxy.target import Target, host_header_for, is_asterisk_options, parse_target


@pytest.mark.parametrize("method, raw, expected", [
    (b"GET", b"http://example.com/", Target("http", "example.com", 80, "/", False)),
    (b"GET", b"http://example.com", Target("http", "example.com", 80, "/", False)),
    (b"GET", b"http://example.com?q=1", Target("http", "example.com", 80, "/?q=1", False)),
    (b"GET", b"http://example.com/a/b?c=d&e=%20f",
     Target("http", "example.com", 80, "/a/b?c=d&e=%20f", False)),
    (b"POST", b"HTTPS://WWW.Example.COM./x", Target("https", "www.example.com", 443, "/x", False)),
    (b"GET", b"HtTp://example.com:8080/", Target("http", "example.com", 8080, "/", False)),
    (b"GET", b"http://example.com:/", Target("http", "example.com", 80, "/", False)),
    (b"GET", b"http://example.com:080/", Target("http", "example.com", 80, "/", False)),
    (b"GET", b"http://127.0.0.1:3128/", Target("http", "127.0.0.1", 3128, "/", False)),
    (b"GET", b"http://[::1]/", Target("http", "::1", 80, "/", False)),
    (b"GET", b"http://[::1]:/x:1", Target("http", "::1", 80, "/x:1", False)),
    (b"GET", b"http://[2001:DB8:0:0::1]:8443/x",
     Target("http", "2001:db8::1", 8443, "/x", False)),
    (b"GET", b"http://[::ffff:192.0.2.1]/", Target("http", "::ffff:c000:201", 80, "/", False)),
    (b"GET", b"http://xn--bcher-kva.example/", Target("http", "xn--bcher-kva.example", 80, "/",
                                                      False)),
    (b"GET", b"http://under_score.example/", Target("http", "under_score.example", 80, "/",
                                                    False)),
    (b"GET", b"http://123.example/", Target("http", "123.example", 80, "/", False)),
    (b"GET", b"http://a/p|a{t}h", Target("http", "a", 80, "/p|a{t}h", False)),
    (b"CONNECT", b"example.com:443", Target("tunnel", "example.com", 443, "", False)),
    (b"CONNECT", b"Example.COM.:8443", Target("tunnel", "example.com", 8443, "", False)),
    (b"CONNECT", b"[::1]:443", Target("tunnel", "::1", 443, "", False)),
    (b"CONNECT", b"10.0.0.1:22", Target("tunnel", "10.0.0.1", 22, "", False)),
])
def test_parse_target_accepts(method, raw, expected):
    assert parse_target(method, raw) == expected


@pytest.mark.parametrize("method, raw, detail", [
    # forms a forward proxy does not take
    (b"GET", b"/index.html", "absolute URL"),
    (b"GET", b"*", "absolute URL"),
    (b"OPTIONS", b"*", "OPTIONS"),
    (b"GET", b"example.com:80", "absolute URL"),
    (b"GET", b"example.com/", "absolute URL"),
    (b"GET", b"ftp://example.com/", "unsupported URL scheme"),
    (b"GET", b"ws://example.com/", "unsupported URL scheme"),
    (b"GET", b"http:/example.com/", "absolute URL"),
    (b"GET", b"http://example.com/#frag", "fragment"),
    (b"GET", b"http://example.com/a b", "invalid character"),
    (b"GET", b"http://example.com/\x00", "invalid character"),
    (b"GET", b"http://example.com/\xc3\xa9", "invalid character"),
    # hosts
    (b"GET", b"http:///path", "empty host"),
    (b"GET", b"http://:80/", "empty host"),
    (b"GET", b"http://user@/", "empty host"),
    (b"GET", b"http://ex%61mple.com/", "percent-encoding"),
    (b"GET", b"http://example..com/", "invalid host name"),
    (b"GET", b"http://.example.com/", "invalid host name"),
    (b"GET", b"http://example.com../", "invalid host name"),
    (b"GET", b"http://exa!mple.com/", "invalid host name"),
    (b"GET", b"http://exa$mple.com/", "invalid host name"),
    (b"GET", b"http://evil.com\\@good.com/", "userinfo"),
    (b"GET", b"http://good.com\\evil.com/", "invalid host name"),
    (b"GET", b"http://" + b"a" * 64 + b".com/", "invalid host name"),
    (b"GET", b"http://" + b"a." * 127 + b"com/", "invalid host name"),
    (b"GET", b"http://us er@a/", "invalid character"),
    (b"GET", b"http://u[ser@a/", "userinfo"),
    (b"GET", b"http://a@b@example.com/", "userinfo"),
    # numeric hosts that resolvers would read as other addresses
    (b"GET", b"http://127.1/", "ambiguous numeric host"),
    (b"GET", b"http://2130706433/", "ambiguous numeric host"),
    (b"GET", b"http://0x7f.0.0.1/", "ambiguous numeric host"),
    (b"GET", b"http://0x7f000001/", "ambiguous numeric host"),
    (b"GET", b"http://127.000.000.001/", "ambiguous numeric host"),
    (b"GET", b"http://1.2.3.4.5/", "ambiguous numeric host"),
    (b"GET", b"http://256.0.0.1/", "ambiguous numeric host"),
    (b"GET", b"http://example.0x10/", "ambiguous numeric host"),
    # IPv6
    (b"GET", b"http://[::1/", "unterminated IPv6"),
    (b"GET", b"http://[::g]/", "invalid IPv6"),
    (b"GET", b"http://[1.2.3.4]/", "invalid IPv6"),
    (b"GET", b"http://[v1.fe]/", "invalid IPv6"),
    (b"GET", b"http://[fe80::1%25eth0]/", "percent-encoding"),
    (b"GET", b"http://[::1]x/", "junk after IPv6"),
    (b"GET", b"http://::1/", "empty host"),
    # ports
    (b"GET", b"http://example.com:0/", "port out of range"),
    (b"GET", b"http://example.com:65536/", "port out of range"),
    (b"GET", b"http://example.com:123456/", "invalid port"),
    (b"GET", b"http://example.com:-1/", "invalid port"),
    (b"GET", b"http://example.com:+80/", "invalid port"),
    (b"GET", b"http://example.com:8o/", "invalid port"),
    (b"GET", b"http://example.com:80:80/", "invalid port"),
    # CONNECT
    (b"CONNECT", b"example.com", "host:port"),
    (b"CONNECT", b"example.com:", "host:port"),
    (b"CONNECT", b"[::1]", "host:port"),
    (b"CONNECT", b"http://example.com:443/", "host:port"),
    (b"CONNECT", b"/", "host:port"),
    (b"CONNECT", b"user:pw@example.com:443", "userinfo"),
    (b"CONNECT", b"example.com:0", "port out of range"),
    (b"CONNECT", b"example.com:443?x", "invalid port"),
    (b"CONNECT", b"exa mple.com:443", "invalid character"),
    (b"CONNECT", b"exa!mple.com:443", "invalid host name"),
    (b"CONNECT", b":443", "empty host"),
    (b"CONNECT", b"[\xff]:443", "invalid character"),
    (b"CONNECT", b"example.com:443\x00", "invalid character"),
])
def test_parse_target_rejects(method, raw, detail):
    with pytest.raises(ProtocolError, match=detail) as excinfo:
        parse_target(method, raw)
    assert excinfo.value.status == 400


@pytest.mark.parametrize("target, authority, url", [
    (Target("http", "example.com", 80, "/a?b", False), "example.com", "http://example.com/a?b"),
    (Target("http", "example.com", 443, "/", False), "example.com:443", "http://example.com:443/"),
    (Target("https", "example.com", 443, "/", True), "example.com", "https://example.com/"),
    (Target("https", "::1", 8443, "/x", False), "[::1]:8443", "https://[::1]:8443/x"),
    (Target("tunnel", "example.com", 443, "", False), "example.com:443", "example.com:443"),
    (Target("tunnel", "2001:db8::1", 80, "", False), "[2001:db8::1]:80", "[2001:db8::1]:80"),
])
def test_authority_and_log_url(target, authority, url):
    assert target.authority() == authority
    assert target.url_for_log() == url
    assert host_header_for(target) == authority.encode()


@pytest.mark.parametrize("raw", [
    b"http://alice:s3cret@example.com/x", b"http://us%40er:p%40ss@example.com/", b"http://@example.com/",
    b"https://alice@example.com/", b"http://alice:s3cret@[::1]:8080/",
])
def test_userinfo_is_refused_without_repeating_it(raw):
    # RFC 9110 4.2.4: userinfo is deprecated in http(s) URIs; a proxy passing it on would leak it.
    with pytest.raises(ProtocolError) as e:
        parse_target(b"GET", raw)
    assert e.value.status == 400
    assert "s3cret" not in e.value.detail and "alice" not in e.value.detail and "p%40ss" not in e.value.detail


@pytest.mark.parametrize("method, raw, expected", [
    (b"OPTIONS", b"*", True),
    (b"GET", b"*", False),
    (b"OPTIONS", b"http://a/", False),
    (b"OPTIONS", b"/*", False),
])
def test_is_asterisk_options(method, raw, expected):
    assert is_asterisk_options(method, raw) is expected


_TARGETISH = st.lists(st.sampled_from([
    b"http", b"HTTPS", b"://", b"[", b"]", b"::1", b":", b"@", b"%", b"80", b"/", b"?", b"#",
    b"example.com", b".", b"127", b"0x", b"\\", b" ", b"\xff", b"\x00", b"user",
]), max_size=20).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"GET", b"CONNECT", b"OPTIONS"]),
       st.one_of(st.binary(max_size=80), _TARGETISH))
def test_parse_target_raises_only_protocol_errors(method, raw):
    try:
        target = parse_target(method, raw)
    except ProtocolError as e:
        assert e.status == 400
        return
    # whatever is accepted has one normal spelling that parses back to itself
    assert target.host == target.host.lower() and not target.host.endswith(".")
    if target.scheme == "tunnel":
        assert parse_target(b"CONNECT", target.authority().encode()) == target
    else:
        again = parse_target(method, target.url_for_log().encode())
        assert again == target
        # what is forwarded is already in its normal form
        assert again.path == target.path


def test_absolute_targets_are_remembered_exactly_and_boundedly():
    from safesquid_tw.proxy import target as target_module

    target_module._ABSOLUTE_TARGETS.clear()
    first = parse_target(b"GET", b"http://Example.COM:80/a/../b?q=1")
    again = parse_target(b"HEAD", b"http://Example.COM:80/a/../b?q=1")
    assert again is first and again.host == "example.com" and again.path == "/b?q=1"
    # Refusals are never remembered: they fail every time.
    for _ in range(2):
        with pytest.raises(ProtocolError):
            parse_target(b"GET", b"http://user:pw@example.com/")
    assert b"http://user:pw@example.com/" not in target_module._ABSOLUTE_TARGETS
    for i in range(target_module._ABSOLUTE_TARGET_ENTRIES + 10):
        parse_target(b"GET", b"http://example.com/%d" % i)
    parse_target(b"GET", b"http://example.com/" + b"x" * 600)
    assert len(target_module._ABSOLUTE_TARGETS) <= target_module._ABSOLUTE_TARGET_ENTRIES
    assert all(len(t) <= target_module._ABSOLUTE_TARGET_MAX for t in target_module._ABSOLUTE_TARGETS)
