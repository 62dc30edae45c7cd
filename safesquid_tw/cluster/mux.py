"""One port for the master's portal and its control plane.

Every connection to the portal port is TLS with the master's certificate. Once the handshake is
done, the ALPN protocol the client asked for decides who gets the connection:
``safesquid-cluster/1`` goes to the Perspective Broker server (slaves), ``http/1.1`` or no ALPN
at all goes to the twisted.web site (browsers, curl, health checks).

The first byte tells TLS (a ClientHello record starts with 0x16) from plain text. Plain HTTP is
served only when it is enabled *and* the port listens on a loopback address (a local reverse
proxy or a health check on the box itself); otherwise the client gets a short ``400`` page
pointing to the https:// address, and the connection is closed.

A connection must reach its protocol (first byte, TLS handshake, ALPN choice) within
`handshake_timeout` seconds, so idle or stalled connections cannot pile up on the port.
"""

from __future__ import annotations

import html
import ipaddress
import re

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from safesquid_tw.cluster.wire import ALPN_CONTROL_PLANE

_log = Logger()

TLS_HANDSHAKE_RECORD = 0x16
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # also the control plane's whole budget to prove the key (guard.py)
# A Host header is copied into the redirect hint only if it looks like host[:port].
_HOST_HEADER = re.compile(rb"\r\nhost:[ \t]*([A-Za-z0-9.\-:\[\]]{1,255})[ \t]*\r\n", re.IGNORECASE)


@attrs.define
class MuxStats:
    """What arrived on the port, for the portal's status page."""

    control_plane: int = 0
    web_tls: int = 0
    web_plain: int = 0
    plain_refused: int = 0
    timed_out: int = 0
    closed_early: int = 0  # by the client or a failed TLS handshake, before reaching a protocol
    refused_by_factory: int = 0


def is_loopback(address: IAddress) -> bool:
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, (IPv4Address, IPv6Address)):
        try:
            return ipaddress.ip_address(address.host.split("%", 1)[0]).is_loopback
        except ValueError:
            return False
    return False


def use_https_response(first_bytes: bytes, local: IAddress) -> bytes:
    """The ``400`` answer to plain HTTP on a TLS-only port, naming the https:// address."""
    m = _HOST_HEADER.search(first_bytes[:8192])
    if m:
        authority = m.group(1).decode("ascii")
    elif isinstance(local, (IPv4Address, IPv6Address)):
        host = f"[{local.host}]" if ":" in local.host else local.host
        authority = f"{host}:{local.port}"
    else:
        authority = ""
    if authority:
        url = html.escape(f"https://{authority}/", quote=True)
        hint = f'Open <a href="{url}">{url}</a> instead.'
    else:
        hint = "Use https:// instead of http://."
    body = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Use HTTPS</title></head>"
        f"<body><h1>Use HTTPS</h1><p>This port speaks HTTPS only. {hint}</p></body></html>\n"
    ).encode("utf-8")
    head = (
        "HTTP/1.1 400 Bad Request\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "Cache-Control: no-store\r\n\r\n"
    ).encode("ascii")
    return head + body


@implementer(IHandshakeListener)
class _AlpnDispatch(Protocol):
    """Inside TLS: waits for the handshake, then hands the connection to the chosen protocol."""

    def __init__(self, port: PortalPortFactory) -> None:
        self._port = port
        self._inner: Protocol | None = None
        self._early: list[bytes] = []
        self.dispatched = lambda: None  # set by the sniffer: stops the handshake deadline
        self.accepted_at: float | None = None  # set by the sniffer: when TCP accepted

    def handshakeCompleted(self) -> None:
        transport = self.transport
        stats = self._port.stats
        control_plane = getattr(transport, "negotiatedProtocol", None) == ALPN_CONTROL_PLANE
        factory = self._port.control_factory if control_plane else self._port.web_factory
        inner = factory.buildProtocol(transport.getPeer())
        if control_plane and inner is not None:
            # The control plane's key-proof deadline counts from the TCP accept (TLS included).
            inner.accepted_at = self.accepted_at
        self.dispatched()
        if inner is None:
            stats.refused_by_factory += 1
            transport.loseConnection()
            return
        if control_plane:
            stats.control_plane += 1
        else:
            stats.web_tls += 1
        self._inner = inner
        inner.makeConnection(transport)
        if IHandshakeListener.providedBy(inner):
            inner.handshakeCompleted()
        early, self._early = self._early, []
        for data in early:
            inner.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
        else:
            self._early.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
            self._inner = None


class _AlpnDispatchFactory(Factory):
    noisy = False

    def __init__(self, port: PortalPortFactory) -> None:
        self._port = port

    def buildProtocol(self, addr: IAddress) -> _AlpnDispatch:
        return _AlpnDispatch(self._port)


class _FirstByte(Protocol):
    """The protocol the listening port builds: looks at the first byte, then delegates."""

    def __init__(self, port: PortalPortFactory, addr: IAddress) -> None:
        self._port = port
        self._addr = addr
        self._inner: Protocol | None = None
        self._refused = False
        self._deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._accepted_at = self._port.clock.seconds()
        self._deadline = self._port.clock.callLater(self._port.handshake_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._deadline = None
        self._port.stats.timed_out += 1
        self.transport.abortConnection()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._refused or not data:
            return
        if data[0] == TLS_HANDSHAKE_RECORD:
            tls = self._port.tls_factory.buildProtocol(self._addr)
            tls.wrappedProtocol.dispatched = self._stop_deadline
            tls.wrappedProtocol.accepted_at = self._accepted_at
            self._start(tls, data)
        elif self._port.plain_http and is_loopback(self.transport.getHost()):
            self._serve_plain(self._port.web_factory, data)
        elif self._port.plain_limited_factory is not None:
            # From elsewhere, plain HTTP reaches only what load balancers need (/health).
            self._serve_plain(self._port.plain_limited_factory, data)
        else:
            self._stop_deadline()
            self._refused = True
            self._port.stats.plain_refused += 1
            self.transport.write(use_https_response(data, self.transport.getHost()))
            self.transport.loseConnection()

    def _serve_plain(self, factory: IProtocolFactory, data: bytes) -> None:
        self._stop_deadline()
        inner = factory.buildProtocol(self._addr)
        if inner is None:
            self._port.stats.refused_by_factory += 1
            self.transport.loseConnection()
            return
        self._port.stats.web_plain += 1
        self._start(inner, data)

    def _start(self, inner: Protocol, data: bytes) -> None:
        self._inner = inner
        inner.makeConnection(self.transport)
        inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._deadline is not None:
            self._port.stats.closed_early += 1
        self._stop_deadline()
        if self._inner is not None:
            self._inner.connectionLost(reason)
            self._inner = None


class PortalPortFactory(Factory):
    """The factory to listen with on the portal port (``--portal``, default tcp:8888).

    `tls_options`: server TLS settings whose ALPN list holds ``safesquid-cluster/1`` and
    ``http/1.1`` (`tlsconfig.MasterIdentity.server_options`). `control_factory`: the PB server
    factory (`jellysafety.ClusterServerFactory`). `web_factory`: the portal's `Site`.
    `plain_http`: serve plain HTTP too, but only when the port's address is a loopback one.
    `plain_limited_factory`: what plain HTTP from elsewhere gets instead of the pointer to
    https:// (the health-check site), if anything.
    """

    noisy = False

    def __init__(
        self,
        tls_options: object,
        control_factory: IProtocolFactory,
        web_factory: IProtocolFactory,
        *,
        clock: IReactorTime,
        plain_http: bool = False,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        plain_limited_factory: IProtocolFactory | None = None,
    ) -> None:
        self.control_factory = control_factory
        self.web_factory = web_factory
        self.clock = clock
        self.plain_http = plain_http
        self.plain_limited_factory = plain_limited_factory
        self.handshake_timeout = handshake_timeout
        self.stats = MuxStats()
        self.tls_factory = TLSMemoryBIOFactory(tls_options, False, _AlpnDispatchFactory(self), clock=clock)

    def buildProtocol(self, addr: IAddress) -> _FirstByte:
        return _FirstByte(self, addr)

    def startFactory(self) -> None:
        # The wrapped factories are never listened with directly, so start and stop them here.
        for factory in self._inner_factories():
            factory.doStart()

    def stopFactory(self) -> None:
        for factory in self._inner_factories():
            factory.doStop()

    def _inner_factories(self) -> list:
        extra = [self.plain_limited_factory] if self.plain_limited_factory is not None else []
        return [self.control_factory, self.web_factory, *extra]


__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "MuxStats",
    "PortalPortFactory",
    "is_loopback",
    "use_https_response",
]
