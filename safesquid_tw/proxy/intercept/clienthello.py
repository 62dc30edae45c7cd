"""The server name a TLS client asks for, read from its first ClientHello (RFC 8446 4.1.2,
RFC 6066 3): what the proxy peeks at when a CONNECT names an IP address.

Pure: bytes in, a verdict out. The ClientHello may span several TLS records; only handshake
records are accepted before it, and at most `MAX_HELLO` bytes are looked at.
"""

from __future__ import annotations

import attrs

MAX_HELLO = 16 * 1024 + 5
HANDSHAKE = 22
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16


class NotTLS(ValueError):
    """The bytes are not a TLS ClientHello (plain HTTP, SSH, garbage...)."""


@attrs.frozen
class ClientHello:
    sni: str | None
    alpn: tuple[bytes, ...] = ()


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The parsed hello, None when more bytes are needed, NotTLS when it cannot be one."""
    body = bytearray()
    pos = 0
    needed: int | None = None
    while True:
        if len(data) < pos + 5:
            return None
        if data[pos] != HANDSHAKE or data[pos + 1] != 3:
            raise NotTLS("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if length == 0 or length > 16384:
            raise NotTLS("bad TLS record length")
        if len(data) < pos + 5 + length:
            if pos + 5 + length > MAX_HELLO * 2:
                raise NotTLS("ClientHello too large")
            return None
        body += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if needed is None and len(body) >= 4:
            if body[0] != CLIENT_HELLO:
                raise NotTLS("the first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(body[1:4], "big")
            if needed > MAX_HELLO * 2:
                raise NotTLS("ClientHello too large")
        if needed is not None and len(body) >= needed:
            return _hello(bytes(body[4:needed]))


def _hello(msg: bytes) -> ClientHello:
    r = _Reader(msg)
    r.take(2 + 32)  # legacy_version, random
    r.take(r.u8())  # legacy_session_id
    r.take(r.u16())  # cipher_suites
    r.take(r.u8())  # legacy_compression_methods
    if r.left() == 0:
        return ClientHello(None)
    extensions = _Reader(r.take(r.u16()))
    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    while extensions.left():
        kind = extensions.u16()
        ext = _Reader(extensions.take(extensions.u16()))
        if kind == EXT_SERVER_NAME:
            names = _Reader(ext.take(ext.u16()))
            while names.left():
                name_type = names.u8()
                name = names.take(names.u16())
                if name_type == 0 and sni is None:
                    try:
                        text = name.decode("ascii").lower().rstrip(".")
                    except UnicodeDecodeError:
                        raise NotTLS("SNI is not ASCII") from None
                    if not text or len(text) > 253 or any(c not in _NAME_CHARS for c in text):
                        raise NotTLS("SNI is not a host name")
                    sni = text
        elif kind == EXT_ALPN:
            protocols = _Reader(ext.take(ext.u16()))
            found = []
            while protocols.left():
                found.append(protocols.take(protocols.u8()))
            alpn = tuple(found)
    return ClientHello(sni, alpn)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise NotTLS("truncated ClientHello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")


__all__ = ["ClientHello", "NotTLS", "parse_client_hello"]
