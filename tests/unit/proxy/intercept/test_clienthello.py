"""The ClientHello peek: the SNI of real hellos (made by OpenSSL), split records, and refusals."""

from __future__ import annotations

import ssl

import pytest

from safesquid_tw.proxy.intercept.clienthello import NotTLS, parse_client_hello


def real_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    if server_hostname is None:
        ctx.check_hostname = False
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_sni_and_alpn_of_a_real_client_hello():
    hello = parse_client_hello(real_hello("www.Example.com", ["h2", "http/1.1"]))
    assert hello.sni == "www.example.com"
    assert hello.alpn == (b"h2", b"http/1.1")


def test_needs_more_bytes_until_the_hello_is_complete():
    data = real_hello("a.example")
    for cut in (0, 3, 5, 20, len(data) - 1):
        assert parse_client_hello(data[:cut]) is None
    assert parse_client_hello(data).sni == "a.example"


def test_hello_split_over_two_records():
    data = real_hello("split.example")
    body = data[5:]
    half = len(body) // 2
    header = data[:3]
    two = header + half.to_bytes(2, "big") + body[:half] + header + (len(body) - half).to_bytes(2, "big") + body[half:]
    assert parse_client_hello(two).sni == "split.example"


def test_no_sni_for_an_ip_address():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    assert parse_client_hello(outgoing.read()).sni is None


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x16\x03\x01\x00\x00",  # empty record
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello, not a ClientHello
])
def test_what_is_not_a_client_hello(data):
    with pytest.raises(NotTLS):
        parse_client_hello(data)


def test_truncated_inner_lengths_are_refused():
    data = bytearray(real_hello("t.example"))
    # A handshake message 20 bytes shorter than its extensions say they are.
    length = int.from_bytes(data[6:9], "big") - 20
    data[6:9] = length.to_bytes(3, "big")
    with pytest.raises(NotTLS):
        parse_client_hello(bytes(data))
