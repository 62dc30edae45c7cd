"""CONNECT tunnels with the fewest calls per tunnel: the origin socket connected and relayed directly.

A CONNECT tunnel is short work repeated thousands of times a second (a browser opens one per TLS
site), so what Twisted does around each connection costs more than the relaying itself. Here:

* The origin connection is a non-blocking socket connected directly (no Connector, no
  ClientFactory, no resolution step scheduled for the next turn, no timeout DelayedCall) and
  wrapped in `OriginSocket`, a `tcp.Connection`, so that buffering, producers and errors behind a
  full socket stay Twisted's. Its writability says the connect is done (`SO_ERROR` says how).
* Bytes go straight to the peer socket when its buffer is empty (`directwrite.write_now`);
  producers are registered only once a peer's buffer actually holds bytes (back-pressure).
* Half-close as RFC 9112 9.6 wants it for a tunnel: an end (FIN) on one side becomes a shutdown of
  the sending half toward the other, done at once when nothing is queued for that side; the tunnel
  closes when both directions have ended, a reset on either side or the idle deadline ends both.
* The connect and idle deadlines of all tunnels are checked by one coarse periodic sweep
  (`TunnelSweep`) instead of a DelayedCall per tunnel moved on every read: a read only marks its
  tunnel active.

The client side stays the `ClientConnection` that read the CONNECT (rules, limits, PROXY header
addresses, the record are all its own); `FastTunnel` speaks the same interface as `tunnel.Tunnel`
toward it. Upgrade (WebSocket) tunnels, which start on a pooled origin connection, and reactors
without file descriptors (unit tests' memory reactors) keep `tunnel.Tunnel`.
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import socket
import struct
from typing import TYPE_CHECKING

from twisted.internet import abstract, error, main, tcp
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import connectionDone
from twisted.python import failure

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not on Linux: the general calls are used
    class EPollReactor:  # type: ignore[no-redef]
        pass

from safesquid_tw.proxy.directwrite import write_now
from safesquid_tw.proxy.responses import ProxyFailure
from safesquid_tw.proxy.tunnel import Tunnel

if TYPE_CHECKING:
    from safesquid_tw.proxy.context import RequestContext
    from safesquid_tw.proxy.frontdoor import ClientConnection

_EAGAIN = errno.EAGAIN
_IN_PROGRESS = frozenset({0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})
_STILL_CONNECTING = frozenset({errno.EALREADY, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})
_SOCKET_FLAGS = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
# The origin socket is only ever used through the C methods (recv, send, shutdown, close...):
# the plain C type, without socket.socket's Python-level constructor and close.
_new_socket = _socket.socket
_Plain = tcp.Connection
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset
_EPOLLIN = getattr(select, "EPOLLIN", 1)
_CLOSED: failure.Failure = connectionDone  # one shared reason for every orderly close


def open_tunnel(conn: "ClientConnection", ctx: "RequestContext"):
    """The tunnel for an allowed CONNECT: the direct one on a reactor with real sockets."""
    if conn.factory.tunnel_sweep.direct:
        return FastTunnel(conn, ctx)
    return Tunnel(conn, ctx)


class OriginSocket(tcp.Connection):
    """The origin side of a `FastTunnel`: connecting until its first writability, then relaying."""

    logstr = "tunnel"

    def __init__(self, skt: socket.socket, tunnel: "FastTunnel", reactor, peer: str) -> None:
        # (tcp.Connection.__init__ would make the socket non-blocking again: it already is.)
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = skt
        self.fileno = skt.fileno
        self.protocol = tunnel
        self.tunnel = tunnel
        self.peer = peer

    def getPeer(self):
        return self.peer

    def getHost(self):
        return self.socket.getsockname()

    def doWrite(self):
        if self.connected:
            return tcp.Connection.doWrite(self)
        # Writable for the first time: the connect has finished, well or not.
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._discard()  # (which stops watching it)
            self.tunnel.connect_failed(self, err)
            return None
        self.connected = 1
        readable_only(self)
        self.tunnel.origin_connected(self)
        return None

    def doRead(self):
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as e:
            if e.args[0] == _EAGAIN:
                return None
            return main.CONNECTION_LOST
        if data:
            self.tunnel.origin_data(data)
            return None
        # The origin's end (FIN): the other direction may go on (half-close).
        self.stopReading()
        self.tunnel.origin_eof()
        return None

    def readConnectionLost(self, reason) -> None:
        self.stopReading()
        self.tunnel.origin_eof()

    def _closeWriteConnection(self) -> None:
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def connectionLost(self, reason) -> None:
        if not hasattr(self, "socket"):
            return
        if not self.connected:
            # The connect failed (epoll says so with an error or hang-up event, not writability).
            try:
                err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as e:
                err = e.errno
            self._discard()
            self.tunnel.connect_failed(self, err or errno.ECONNABORTED)
            return
        abstract.FileDescriptor.connectionLost(self, reason)
        self._closeSocket(not reason.check(error.ConnectionAborted))
        del self.socket
        self.fileno = _no_fileno
        self.tunnel.origin_lost(reason)

    def shut_write(self) -> None:
        """Send our FIN to the origin: at once when nothing is queued, else once it is written."""
        if not self._tempDataBuffer and len(self.dataBuffer) == self.offset and self.producer is None:
            self._writeDisconnecting = self._writeDisconnected = True
            self._closeWriteConnection()
        else:
            self.loseWriteConnection()

    def close(self) -> None:
        """Close at once when nothing is queued (one close(2), nothing left for the reactor to
        do), else after the queued bytes are written."""
        if not hasattr(self, "socket"):
            return
        if self._tempDataBuffer or len(self.dataBuffer) != self.offset or not self.connected:
            if self.connected:
                self.loseConnection()
            else:
                self._discard()
            return
        self._discard()

    def abort(self) -> None:
        if hasattr(self, "socket"):
            self._discard(linger=True)

    def _discard(self, linger: bool = False) -> None:
        if not forget_before_close(self.reactor, self.socket.fileno()):
            self.stopReading()
            self.stopWriting()
        self.connected = 0
        self.disconnected = 1
        self.producer = None
        skt = self.socket
        del self.socket
        self.fileno = _no_fileno
        try:
            if linger:  # a reset, as abortConnection sends
                skt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            skt.close()
        except OSError:
            pass


def _no_fileno() -> int:
    return -1


def readable_only(fd_object) -> None:
    """Watch `fd_object` for reading instead of writing: one epoll_ctl (MOD) where
    stopWriting + startReading make two (DEL, ADD)."""
    reactor = fd_object.reactor
    fd = fd_object.fileno()
    writes = getattr(reactor, "_writes", None)
    if not isinstance(reactor, EPollReactor) or not isinstance(writes, set) or fd not in writes \
            or fd in reactor._reads:
        fd_object.stopWriting()
        fd_object.startReading()
        return
    reactor._poller.modify(fd, _EPOLLIN)
    writes.discard(fd)
    reactor._reads.add(fd)


def forget_before_close(reactor, fd: int) -> bool:
    """Stop watching `fd`, which the caller closes next, without an epoll_ctl: closing a
    descriptor nobody else holds (no dup, no fork since it was made; sockets are close-on-exec)
    takes it out of the epoll set, so only the reactor's own bookkeeping is updated. False
    (nothing done) on other reactors: the caller uses stopReading/stopWriting."""
    if not isinstance(reactor, EPollReactor) or type(reactor._reads) is not set:
        return False
    reactor._reads.discard(fd)
    reactor._writes.discard(fd)
    reactor._selectables.pop(fd, None)
    return True


def close_now(transport) -> bool:
    """Close the client's plain TCP transport at once when nothing is queued for it: the
    socket closed (which also takes it out of epoll), then the protocol's connectionLost, without
    the stopReading/stopWriting calls, the new Failure and the reason checks of Twisted's
    loseConnection -> connectionLost chain. False (nothing done) when the transport is not in
    that state: the caller then uses loseConnection."""
    if (not isinstance(transport, _Plain) or transport.TLS or not transport.connected or transport.disconnecting
            or transport._tempDataBuffer or len(transport.dataBuffer) != transport.offset
            or transport.producer is not None or not hasattr(transport, "socket")):
        return False
    skt = transport.socket
    if not forget_before_close(transport.reactor, skt.fileno()):
        return False
    transport.disconnected = 1
    transport.connected = 0
    try:
        if transport._shouldShutdown:
            skt.shutdown(socket.SHUT_RDWR)  # as Twisted's orderly close
    except OSError:
        pass
    try:
        skt.close()
    except OSError:
        pass
    protocol = transport.protocol
    del transport.protocol
    del transport.socket
    del transport.fileno
    protocol.connectionLost(_CLOSED)
    return True


class _PauseOrigin:
    """The client's buffer is full: stop reading from the origin until it drains."""

    __slots__ = ("tunnel",)

    def __init__(self, tunnel: "FastTunnel") -> None:
        self.tunnel = tunnel

    def pauseProducing(self) -> None:
        origin = self.tunnel.origin
        if origin is not None and not self.tunnel._origin_ended:
            origin.stopReading()

    def resumeProducing(self) -> None:
        tunnel = self.tunnel
        origin = tunnel.origin
        if origin is not None and not tunnel._origin_ended and not tunnel._closed and origin.connected:
            origin.startReading()

    def stopProducing(self) -> None:
        pass  # the client went away: its connectionLost closes the tunnel


class FastTunnel:
    """One CONNECT tunnel: the client's `ClientConnection` and an `OriginSocket`."""

    __slots__ = ("conn", "ctx", "origin", "bytes_from_client", "bytes_to_client", "active", "quiet_since",
                 "deadline", "_closed", "_client_ended", "_origin_ended", "_addresses", "_index", "_last",
                 "_client_held", "_origin_held", "__weakref__")

    def __init__(self, conn: "ClientConnection", ctx: "RequestContext") -> None:
        self.conn = conn
        self.ctx = ctx
        self.origin: OriginSocket | None = None
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.active = True  # bytes moved since the sweep last looked
        self.quiet_since = 0.0
        self.deadline = 0.0  # while connecting: when the connect times out
        self._closed = False
        self._client_ended = False  # the client shut down its sending half
        self._origin_ended = False  # the origin did
        self._addresses: list = []
        self._index = 0
        self._last: ProxyFailure | None = None
        self._client_held = False  # a producer is registered on the client's transport
        self._origin_held = False  # ... on the origin's

    # -- opening ----------------------------------------------------------------------------
    def open(self) -> None:
        resolver = self.conn.factory.pool.resolver
        host = self.ctx.target.host
        addresses = resolver.known(host)
        if addresses is not None:  # an address or a cached answer: no Deferred needed
            self._resolved(addresses)
            return
        d = resolver.resolve(host)
        if d.called and isinstance(d.result, list):
            self._resolved(d.result)  # an address or a cached answer: no callback chain needed
        else:
            d.addCallbacks(self._resolved, self._fail)

    def _resolved(self, addresses) -> None:
        if self._closed:
            return
        self._addresses = addresses
        self._index = 0
        self._connect_next()

    def _connect_next(self) -> None:
        target = self.ctx.target
        factory = self.conn.factory
        port = target.port
        while True:
            if self._index >= len(self._addresses):
                self._fail(self._last or ProxyFailure(502, "destination_unavailable", f"no address for {target.host}"))
                return
            family, ip = self._addresses[self._index]
            self._index += 1
            if factory.pool.is_self(ip, port):
                self._fail(ProxyFailure(508, "proxy_loop_detected", f"{target.host}:{port} is this proxy itself"))
                return
            peer = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            try:
                skt = _new_socket(family, _SOCKET_FLAGS)
            except OSError as e:
                self._last = ProxyFailure(502, "destination_unavailable", f"cannot connect to {peer}: {e}")
                continue
            try:
                # A proxy relays what each side wrote as it comes: no Nagle delay on small writes.
                skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = skt.connect_ex((ip, port))
            except OSError as e:
                err = e.errno or errno.EINVAL
            if err and err in _IN_PROGRESS and factory.tunnel_sweep.ask_again:
                # Asked again at once: to a nearby origin (loopback, the same host) the handshake
                # has usually completed within the first call, and then the tunnel opens now,
                # without waiting for a writability event (and its epoll changes).
                try:
                    err = skt.connect_ex((ip, port))
                except OSError as e:
                    err = e.errno or errno.EINVAL
                if err == errno.EISCONN:
                    err = 0
                elif err in _STILL_CONNECTING:
                    err = errno.EINPROGRESS
            if err and err not in _IN_PROGRESS:
                skt.close()
                self._last = _connect_failure(peer, err, factory.limits.connect_timeout)
                continue
            origin = OriginSocket(skt, self, factory.reactor, peer)
            self.origin = origin
            self.deadline = factory.reactor.seconds() + factory.limits.connect_timeout
            factory.tunnel_sweep.add(self)
            if err:
                origin.startWriting()  # connecting: its first writability says how it went
                return
            origin.connected = 1
            origin.startReading()
            self.origin_connected(origin)
            return

    def connect_failed(self, origin: OriginSocket, err: int) -> None:
        self.origin = None
        if self._closed:
            return
        self._last = _connect_failure(origin.peer, err, self.conn.factory.limits.connect_timeout)
        self._connect_next()

    def origin_connected(self, origin: OriginSocket) -> None:
        self.conn.factory.pool.connections_made += 1
        if self._closed:
            origin.close()
            return
        self.active = True
        self.conn.tunnel_ready(self)

    def _fail(self, reason) -> None:
        if self._closed:
            return
        self._closed = True
        self.conn.factory.tunnel_sweep.discard(self)
        err = getattr(reason, "value", reason)
        if not isinstance(err, ProxyFailure):
            err = ProxyFailure(502, "proxy_internal_error", f"cannot open the tunnel: {err}")
        self.conn.tunnel_failed(self, err)

    # -- relaying ---------------------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        self.bytes_from_client += len(data)
        self.active = True
        origin = self.origin
        if origin is None:
            return
        write_now(origin, data)
        if not self._origin_held and (origin._tempDataBuffer or len(origin.dataBuffer) != origin.offset):
            # The origin reads slower than the client sends: from now on its buffer holds the client.
            self._origin_held = True
            origin.registerProducer(self.conn.gate.producer("upstream-full"), True)

    def origin_data(self, data: bytes) -> None:
        self.bytes_to_client += len(data)
        self.active = True
        transport = self.conn.transport
        write_now(transport, data)
        if not self._client_held and (not isinstance(transport, _Plain) or transport._tempDataBuffer
                                      or len(transport.dataBuffer) != transport.offset):
            self._client_held = True
            transport.registerProducer(_PauseOrigin(self), True)

    def client_eof(self) -> None:
        """The client will send nothing more: pass the end on, keep the answer flowing."""
        if self._closed or self._client_ended:
            return
        self._client_ended = True
        origin = self.origin
        if self._origin_ended or origin is None:
            self._close(None)
            return
        if self._origin_held:
            self._origin_held = False
            origin.unregisterProducer()
        origin.shut_write()

    def origin_eof(self) -> None:
        """The origin will send nothing more: end the client's read side of it, keep uploading."""
        if self._closed or self._origin_ended:
            return
        self._origin_ended = True
        if self._client_ended:
            self._close(None)
            return
        transport = self.conn.transport
        if self._client_held:
            self._client_held = False
            transport.unregisterProducer()
        if (isinstance(transport, _Plain) and not transport.TLS and transport.connected
                and not transport.disconnecting and not transport._tempDataBuffer
                and len(transport.dataBuffer) == transport.offset and transport.producer is None):
            # Nothing queued: the FIN leaves now rather than after a writability event.
            transport._writeDisconnecting = transport._writeDisconnected = True
            transport._shouldShutdown = False  # the close that follows needs no second shutdown
            try:
                transport.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            transport.loseWriteConnection()

    def origin_lost(self, reason) -> None:
        """The origin's socket is gone (a reset, or a close we asked for)."""
        self.origin = None
        self._close(None)  # (as a tunnel on a pooled connection: a reset ends it like a close)

    def side_closed(self, side: str) -> None:
        self._close(f"{side} closed")

    # -- the sweep ----------------------------------------------------------------------------
    def check(self, now: float) -> None:
        """Called about once a second by the sweep: the connect and idle deadlines."""
        if self._closed:
            return
        origin = self.origin
        limits = self.conn.factory.limits
        if origin is not None and not origin.connected:
            if now >= self.deadline:
                origin.abort()
                self.origin = None
                self._last = ProxyFailure(504, "connection_timeout",
                                          f"connecting to {origin.peer} took longer than {limits.connect_timeout:g} s")
                self._connect_next()
            return
        if self.active:
            self.active = False
            self.quiet_since = now
        elif now - self.quiet_since >= limits.tunnel_idle_timeout:
            peer = origin.peer if origin is not None else "the origin"
            self._close(f"tunnel idle ({limits.tunnel_idle_timeout:g} s, {peer})", abort=True)

    # -- the end ------------------------------------------------------------------------------
    def _close(self, detail: str | None, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self.conn
        conn.factory.tunnel_sweep.discard(self)
        if detail and self.ctx.detail is None and "closed" not in detail:
            self.ctx.detail = detail
        transport = conn.transport
        if self._client_held and transport is not None:
            self._client_held = False
            transport.unregisterProducer()
        origin, self.origin = self.origin, None
        if origin is not None:
            if self._origin_held:
                self._origin_held = False
                origin.unregisterProducer()
            if abort:
                origin.abort()
            else:
                origin.close()
        conn.tunnel_closed(self)


def _connect_failure(peer: str, err: int, timeout: float) -> ProxyFailure:
    if err == errno.ECONNREFUSED:
        return ProxyFailure(502, "connection_refused", f"{peer} refused the connection")
    if err == errno.ETIMEDOUT:
        return ProxyFailure(504, "connection_timeout", f"connecting to {peer} took longer than {timeout:g} s")
    return ProxyFailure(502, "destination_unavailable", f"cannot connect to {peer}: {os.strerror(err)}")


class TunnelSweep:
    """The connect and idle deadlines of every open `FastTunnel`, looked at once per period.

    One repeating call for all tunnels (and none while there are none) instead of a DelayedCall per
    tunnel: idle deadlines are met within one period, which at most a second is nothing against
    minutes of idleness, and a shorter configured deadline shortens the period with it."""

    def __init__(self, reactor, limits) -> None:
        self.reactor = reactor
        # Direct sockets need a reactor that watches file descriptors (not a test's memory reactor).
        self.direct = isinstance(reactor, PosixReactorBase)
        # Ask a connecting socket again at once whether it is connected (see _connect_next);
        # False: always wait for its writability (unit tests of the connecting phase).
        self.ask_again = True
        self.period = max(0.05, min(1.0, limits.tunnel_idle_timeout / 4, limits.connect_timeout / 4))
        self.live: set[FastTunnel] = set()
        self._call = None

    def add(self, tunnel: FastTunnel) -> None:
        self.live.add(tunnel)
        if self._call is None:
            self._call = self.reactor.callLater(self.period, self._sweep)

    def discard(self, tunnel: FastTunnel) -> None:
        self.live.discard(tunnel)

    def _sweep(self) -> None:
        self._call = None
        now = self.reactor.seconds()
        for tunnel in list(self.live):
            tunnel.check(now)
        if self.live:
            self._call = self.reactor.callLater(self.period, self._sweep)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
