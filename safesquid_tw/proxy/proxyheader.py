"""The PROXY protocol (versions 1 and 2) on the proxy's `haproxy:` listeners.

A balancer in front of the nodes (HAProxy with `send-proxy-v2`) opens each connection with a
PROXY header naming the client it accepted. On a `haproxy:` listener that address is the
client for everything: access rules, authentication exemptions, records, X-Forwarded-For and
the per-client limits.

Twisted ships a wrapper (`twisted.protocols.haproxy`), but it does not fit a gateway:
- it connects the wrapped protocol before the header has arrived, so whatever the protocol reads
  from `getPeer()` at connection time is the balancer's address;
- a header split over two reads (fewer than 16 bytes, or 8 for version 1, in the first one) is
  taken as no header at all, and a missing or malformed header is closed silently, uncounted;
- a connection that never sends its header is kept open for ever;
- version 1 addresses are not checked (`PROXY TCP4 garbage ...` becomes the client's address) and
  a port that is no number raises out of the parser.
Its handling of `LOCAL` (version 2) and `UNKNOWN` (version 1) is right, and kept here: such a
connection (HAProxy's own health checks) is served as the balancer's own address.

So this module has its own parser (`parse_proxy_header`, a pure function) and wrapper
(`ProxyHeaderFactory`): the wrapped protocol is built and connected only once a valid header has
been read, within the first-byte deadline, from a peer the `--proxy-protocol-from` list allows.
Everything else is closed without a byte of answer, counted on the proxy factory and logged.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import attrs
from twisted.internet import address, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols import policies
from zope.interface import alsoProvides

from safesquid_tw.policy.networks import NetworkSet

log = Logger()

ENDPOINT_PREFIX = "haproxy:"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest version 1 line, CRLF included (the specification's figure)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 4096  # addresses plus the TLVs a balancer adds; a longer "header" is refused
LOG_INTERVAL = 10.0  # at most one log line per reason this often; the counters count them all


class ProxyHeaderError(ValueError):
    """The bytes are no valid PROXY header; the message says why (for the event log)."""


@attrs.frozen
class ProxyHeader:
    size: int  # bytes the header takes at the start of the stream
    source: tuple[str, int] | None  # the client; None: LOCAL/UNKNOWN, the connection's own peer
    version: int


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyHeaderError(f"bad port {text[:8]!r}")
    return int(text)


def _v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyHeaderError("version 1 header without CRLF within 107 bytes")
        return None
    parts = data[:end].split(b" ")
    family = parts[1] if len(parts) > 1 else b""
    if family == b"UNKNOWN":
        return ProxyHeader(end + 2, None, 1)
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"version 1 header with unknown protocol {family[:8]!r}")
    if len(parts) != 6:
        raise ProxyHeaderError("version 1 header without four address fields")
    af = socket.AF_INET if family == b"TCP4" else socket.AF_INET6
    try:
        source = socket.inet_ntop(af, socket.inet_pton(af, parts[2].decode("ascii")))
        socket.inet_pton(af, parts[3].decode("ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"version 1 header with a bad {family.decode()} address") from None
    source_port = _port(parts[4])
    _port(parts[5])
    return ProxyHeader(end + 2, (source, source_port), 1)


def _v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family_transport, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"version 2 signature with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"version 2 header with unknown command {command}")
    size = 16 + length
    if size > V2_MAX:
        raise ProxyHeaderError(f"version 2 header of {size} bytes")
    if len(data) < size:
        return None
    if command == 0:  # LOCAL: the balancer speaking for itself (health checks)
        return ProxyHeader(size, None, 2)
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family in (0, 3):  # UNSPEC or UNIX: no IP to take; the specification says use the peer's
        return ProxyHeader(size, None, 2)
    if transport != 1:
        raise ProxyHeaderError("version 2 header for a transport other than TCP")
    if family == 1 and length >= 12:
        source = socket.inet_ntop(socket.AF_INET, data[16:20])
        source_port = struct.unpack("!H", data[24:26])[0]
    elif family == 2 and length >= 36:
        source = socket.inet_ntop(socket.AF_INET6, data[16:32])
        source_port = struct.unpack("!H", data[48:50])[0]
    else:
        raise ProxyHeaderError(f"version 2 header with family {family} and {length} address bytes")
    return ProxyHeader(size, (source, source_port), 2)


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of `data`; None while more bytes are needed.

    Raises ProxyHeaderError when the bytes cannot be the start of a valid header, including
    when they are no PROXY header at all (an HTTP request sent straight to the listener).
    """
    if data[:12] == V2_SIGNATURE[: len(data)] and len(data) < 12:
        return None
    if data.startswith(V2_SIGNATURE):
        return _v2(data)
    if data[:6] == V1_PREFIX[: len(data)] and len(data) < 6:
        return None
    if data.startswith(V1_PREFIX):
        return _v1(data)
    raise ProxyHeaderError("no PROXY header")


def split_endpoint(description: str) -> tuple[bool, str]:
    """(is a PROXY listener, the inner endpoint) for a `--listen` value."""
    if description[: len(ENDPOINT_PREFIX)].lower() == ENDPOINT_PREFIX:
        return True, description[len(ENDPOINT_PREFIX):]
    return False, description


class _LogBrake:
    """At most one log line per reason per LOG_INTERVAL; it names how many went unlogged."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, reason: str, peer: str, detail: str) -> None:
        now = self.clock.seconds()
        last, quiet = self._last.get(reason, (float("-inf"), 0))
        if now - last < LOG_INTERVAL:
            self._last[reason] = (last, quiet + 1)
            return
        self._last[reason] = (now, 0)
        more = f" ({quiet} more since the last line)" if quiet else ""
        log.warn("PROXY listener: closed a connection from {peer}: {detail}{more}", peer=peer, detail=detail,
                 more=more)


class ProxyHeaderProtocol(policies.ProtocolWrapper):
    """Reads the PROXY header, then stands between the transport and the proxy's protocol."""

    def __init__(self, factory: "ProxyHeaderFactory", addr) -> None:
        super().__init__(factory, None)  # the wrapped protocol is built once the header is read
        self._addr = addr
        self._buf = b""
        self._peer = None
        self._timer = None

    def makeConnection(self, transport) -> None:
        protocol.Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        factory: ProxyHeaderFactory = self.factory
        real = self.transport.getPeer()
        allowed = factory.allowed
        if allowed is not None and getattr(real, "host", "") not in allowed:
            factory.refused("peer_refused", real, "this peer may not send PROXY headers (--proxy-protocol-from)")
            self.transport.abortConnection()
            return
        self._timer = factory.reactor.callLater(factory.timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        self._reject(f"no PROXY header within {self.factory.timeout:g} s")

    def _reject(self, detail: str) -> None:
        self.factory.refused("header_invalid", self.transport.getPeer(), detail)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._timer is None:  # refused or timed out: whatever still arrives is ignored
            return
        self._buf += data
        try:
            header = parse_proxy_header(self._buf)
        except ProxyHeaderError as e:
            self._cancel()
            self._reject(str(e))
            return
        if header is None:
            return
        self._cancel()
        rest, self._buf = self._buf[header.size:], b""
        real = self.transport.getPeer()
        if header.source is None:
            self._peer = real
        else:
            host, port = header.source
            kind = address.IPv6Address if ":" in host else address.IPv4Address
            self._peer = kind("TCP", host, port)
        self.factory.accepted += 1
        inner = self.factory.wrappedFactory.buildProtocol(self._peer)
        if inner is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = inner
        if IHalfCloseableProtocol.providedBy(inner):
            # The transport asks its protocol (this wrapper) whether it takes half-closes: say
            # yes exactly when the proxy's protocol does, so tunnels keep half-close semantics.
            alsoProvides(self, IHalfCloseableProtocol)
        inner.makeConnection(self)
        if rest and self.wrappedProtocol is not None and not self.disconnecting:
            inner.dataReceived(rest)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def getPeer(self):
        return self._peer if self._peer is not None else self.transport.getPeer()

    def readConnectionLost(self) -> None:
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason) -> None:
        self._cancel()
        inner, self.wrappedProtocol = self.wrappedProtocol, None
        if inner is not None:
            inner.connectionLost(reason)


class ProxyHeaderFactory(policies.WrappingFactory):
    """Wraps the proxy factory on a `haproxy:` listener.

    Refusals are counted on the wrapped (proxy) factory's plain attributes `proxy_header_invalid`
    (missing, malformed or late header) and `proxy_peer_refused` (a peer outside
    `--proxy-protocol-from`), where /health and metrics read them."""

    protocol = ProxyHeaderProtocol

    def __init__(self, wrapped, *, reactor, timeout: float, allowed: NetworkSet | None) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.timeout = timeout
        self.allowed = allowed
        self.accepted = 0
        self._brake = _LogBrake(reactor)

    def buildProtocol(self, addr) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self, addr)

    def refused(self, reason: str, peer: Any, detail: str) -> None:
        key = "proxy_peer_refused" if reason == "peer_refused" else "proxy_header_invalid"
        target = self.wrappedFactory
        setattr(target, key, getattr(target, key, 0) + 1)
        self._brake.warn(reason, getattr(peer, "host", "?"), detail)


def parse_networks(text: str) -> NetworkSet:
    """`--proxy-protocol-from`: comma-separated networks (ValueError names a bad one)."""
    import ipaddress

    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{part!r} is not a network (e.g. 10.0.0.0/8 or 192.0.2.7)") from None
    if not networks:
        raise ValueError("no network given")
    return NetworkSet(networks)


__all__ = [
    "ProxyHeader", "ProxyHeaderError", "ProxyHeaderFactory", "ProxyHeaderProtocol", "parse_networks",
    "parse_proxy_header", "split_endpoint",
]
