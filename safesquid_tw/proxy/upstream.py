"""Connections toward origin servers: one HTTP/1.1 client connection each, kept in a pool.

An `UpstreamConnection` carries one request at a time and reports the response to whoever sent it
(its `sink`, the client-side exchange): interim 1xx responses, the final head, decoded body bytes,
the end, or a failure. When a response ends cleanly on a connection both sides keep open, the
connection goes back to the pool for the next request to the same origin.
"""

from __future__ import annotations

import socket
from typing import Callable, Protocol as TypingProtocol

from twisted.internet import defer, error, protocol, ssl
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer

from safesquid_tw.config import Limits
from safesquid_tw.proxy import http1
from safesquid_tw.proxy.directwrite import write_now
from safesquid_tw.proxy.responses import ProxyFailure
from safesquid_tw.proxy.flow import ReadGate
from safesquid_tw.proxy.peekready import readable_now
from safesquid_tw.proxy.headers import connection_options
from safesquid_tw.proxy.resolver import Resolver

log = Logger()

MAX_RESPONSE_LINE = 64 * 1024
MAX_RESPONSE_HEAD = 256 * 1024
PARKED = 86400.0
# Interim (1xx) responses relayed for one request; an origin sending more is broken or hostile
# (each costs a write to the client, and a flood of them would grow the client's buffer).
MAX_INTERIM_RESPONSES = 10

PoolKey = tuple[str, str, int]


class ResponseSink(TypingProtocol):
    def upstream_interim(self, head: http1.ResponseHead) -> None: ...
    def upstream_head(self, head: http1.ResponseHead, framing: http1.Framing) -> None: ...
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_done(self) -> None: ...
    def upstream_switched(self, head: http1.ResponseHead, rest: bytes) -> None: ...
    def upstream_failed(self, failure: ProxyFailure, *, retryable: bool) -> None: ...


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class UpstreamConnection(protocol.Protocol):
    tls_tolerated = False  # set after a TLS handshake (a class default: no failed look-up per request)

    def __init__(self, pool: "UpstreamPool", key: PoolKey, peer: str) -> None:
        self.pool = pool
        self.key = key
        self.peer = peer  # "ip:port" actually contacted, for logs
        self.sink: ResponseSink | None = None
        self.gate: ReadGate | None = None
        self.requests_served = 0
        self._state = "idle"  # idle, head, body, switched, closed
        self._buf = bytearray()
        self._framing: http1.Framing | None = None
        self._remaining = 0
        self._decoder: http1.ChunkedDecoder | None = None
        self._method = b"GET"
        self._request_complete = False
        self._keep_alive = True
        self._got_bytes = False
        self._interim = 0
        self._timer = None
        self._timer_info: tuple[str, str, float] | None = None
        self._body_deadline_due = False  # the read deadline's call waits to be moved (dataReceived)
        self.connected_since = 0.0

    # -- lifetime -------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.gate = ReadGate(self.transport)
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        factory = getattr(self, "factory", None)
        if factory is not None and self.key[0] != "https":
            factory.connected(self)
        elif factory is not None:
            # An https origin is handed out only once its certificate checked out (handshakeCompleted),
            # and its handshake gets the connect timeout.
            self._handshake_timer = self.pool.reactor.callLater(
                self.pool.limits.connect_timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        self._tls_problem = ProxyFailure(
            504, "connection_timeout",
            f"the TLS handshake with {self.peer} took longer than {self.pool.limits.connect_timeout:g} s")
        self.transport.abortConnection()

    def _stop_handshake_timer(self) -> None:
        timer = getattr(self, "_handshake_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        self._handshake_timer = None

    def handshakeCompleted(self) -> None:
        self._stop_handshake_timer()
        factory = getattr(self, "factory", None)
        tls = self.pool.tls
        problem, self.tls_tolerated = tls.check(self.transport, self.key[1], self.peer) if tls is not None else (None, False)
        if problem is not None:
            self._tls_problem = problem
            self.transport.abortConnection()
            return
        if factory is not None:
            self.tls_session_kept = self.tls_tolerated  # verified: its session may be resumed (pool.release)
            factory.connected(self)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._stop_handshake_timer()
        factory = getattr(self, "factory", None)
        if factory is not None and not factory.deferred.called and self.key[0] == "https":
            # Never handed out: the TLS handshake or the certificate check failed.
            problem = getattr(self, "_tls_problem", None)
            if problem is None and self.pool.tls is not None:
                problem = self.pool.tls.handshake_failure(reason, self.key[1], self.peer)
            factory.deferred.errback(problem or reason)
        self._drop_timer()
        state, self._state = self._state, "closed"
        self.pool._forget(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if state == "body" and self._framing is not None and self._framing.kind == "close":
            if reason is None or not reason.check(error.ConnectionLost):
                sink.upstream_done()  # the close is the body's end
            else:
                # A TCP reset is not an end: what came may be cut short anywhere.
                sink.upstream_failed(
                    ProxyFailure(502, "http_response_incomplete", f"{self.peer} reset the connection mid-response"),
                    retryable=False,
                )
        elif state == "switched":
            sink.upstream_done()
        elif state == "head" and not self._got_bytes:
            sink.upstream_failed(
                ProxyFailure(502, "connection_terminated", f"{self.peer} closed the connection without answering"),
                retryable=self.requests_served > 0,
            )
        elif state in ("head", "body"):
            sink.upstream_failed(
                ProxyFailure(502, "http_response_incomplete", f"{self.peer} closed the connection mid-response"),
                retryable=False,
            )

    def readConnectionLost(self) -> None:
        """The origin shut down its sending half. In a tunnel the other direction keeps flowing
        (the tunnel closes when both have ended); otherwise this is the end of the connection,
        as it always was for HTTP."""
        if self._state == "switched" and self.sink is not None and hasattr(self.sink, "upstream_eof"):
            self.sink.upstream_eof()
            return
        # Only TCP transports call this; what TCP does for a protocol without half-close.
        self.transport.connectionLost(failure.Failure(error.ConnectionDone()))

    def writeConnectionLost(self) -> None:
        pass  # our own loseWriteConnection completed; the tunnel waits for the origin's end

    # -- the request ----------------------------------------------------------------------
    def start_request(self, sink: ResponseSink, head: bytes, method: bytes) -> None:
        if self._timer_info is not None:  # (a connection just taken from the pool has none)
            self._cancel_timer()
        self.sink = sink
        self._state = "head"
        self._method = method
        self._request_complete = False
        self._keep_alive = True
        self._got_bytes = False
        self._interim = 0
        self._framing = None
        self._decoder = None
        write_now(self.transport, head)

    def send_body(self, data: bytes) -> None:
        write_now(self.transport, data)
        self._restart_timer(self.pool.limits.read_timeout, "http_request_error", "the upload stalled")

    def end_request(self) -> None:
        """The whole request is sent: from now on the origin must start answering in time."""
        self._request_complete = True
        if self._state == "head" and not self._got_bytes:
            self._restart_timer(
                self.pool.limits.response_timeout, "http_response_timeout", "the origin did not answer in time"
            )

    def switch(self, sink: ResponseSink) -> None:
        """Carry opaque bytes from now on (CONNECT, or after a 101); never pooled again."""
        self.sink = sink
        self._state = "switched"
        self._restart_timer(self.pool.limits.tunnel_idle_timeout, "connection_timeout", "tunnel idle")

    def send_raw(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.pool.limits.tunnel_idle_timeout)
        write_now(self.transport, data)

    def close_tunnel(self) -> None:
        self._cancel_timer()
        if self._state != "closed":
            self._state = "closed"
            self.transport.loseConnection()

    def abandon(self) -> None:
        """The client went away: this connection's state is unknown, so it is not reused."""
        self.sink = None
        self._cancel_timer()
        if self._state != "closed":
            self._state = "closed"
            self.transport.abortConnection()

    # -- the response ---------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._state == "switched":
            if self._timer is not None and self._timer.active():
                self._timer.reset(self.pool.limits.tunnel_idle_timeout)
            if self.sink is not None:
                self.sink.upstream_data(data)
            return
        if self._state in ("idle", "closed"):
            # Bytes nobody asked for (late bytes after a HEAD, 204 or 304 answer, or sent while
            # idle in the pool): the connection cannot be trusted any more. "closed" at once, so
            # the pool never hands it out before the abort completes.
            self._state = "closed"
            self.pool._forget(self)
            self.transport.abortConnection()
            return
        self._got_bytes = True
        # What this read makes the client connection write (head and body) leaves in one send.
        client = getattr(self.sink, "conn", None)
        batch = getattr(client, "output", None)
        batching = batch is not None and batch.begin(client.transport)
        try:
            if self._state == "head":
                self._buf += data
                self._parse_heads()
            elif self._state == "body":
                self._body(data)
        except http1.ProtocolError as e:
            self._fail(ProxyFailure(502, "http_protocol_error", f"the origin sent an invalid response: {e.detail}"))
        finally:
            if self._body_deadline_due:
                self._move_body_deadline()
            if batching:
                client.send_output()

    def _move_body_deadline(self) -> None:
        """The body's read deadline counts from this read: moved once per read, after it was
        handled, and only if the body goes on (a response read whole with its head goes back to
        the pool, whose idle deadline replaces it; no turn of the reactor passes in between)."""
        self._body_deadline_due = False
        if self._state == "body" and self._timer_info is not None:
            seconds = self._timer_info[2]
            timer = self._timer
            if timer is not None and timer.active():
                timer.reset(seconds)
            else:
                self._timer = self.pool.reactor.callLater(seconds, self._timed_out)

    def _parse_heads(self) -> None:
        while self._state == "head":
            end = http1.split_head(self._buf, MAX_RESPONSE_LINE, MAX_RESPONSE_HEAD)
            if end < 0:
                if self._request_complete:
                    self._restart_timer(self.pool.limits.read_timeout, "http_response_timeout", "the response head stalled")
                return
            raw = bytes(self._buf[:end])
            del self._buf[:end]
            head = http1.parse_response_head(raw)
            sink = self.sink
            if head.status == 101:
                self._state = "switched"
                self._cancel_timer()
                rest = bytes(self._buf)
                self._buf.clear()
                self._restart_timer(self.pool.limits.tunnel_idle_timeout, "connection_timeout", "tunnel idle")
                if sink is not None:
                    sink.upstream_switched(head, rest)
                return
            if head.status < 200:
                self._interim += 1
                if self._interim > MAX_INTERIM_RESPONSES:
                    raise http1.ProtocolError(
                        502, f"more than {MAX_INTERIM_RESPONSES} interim (1xx) responses to one request")
                if sink is not None:
                    sink.upstream_interim(head)
                continue
            framing = http1.response_framing(head, self._method)
            self._framing = framing
            tokens = connection_options(head.values(b"connection"))
            if b"close" in tokens or (head.version == b"HTTP/1.0" and b"keep-alive" not in tokens):
                self._keep_alive = False
            self._state = "body"
            self._timer_info = ("http_response_timeout", "the response body stalled", self.pool.limits.read_timeout)
            self._body_deadline_due = True  # the call itself is moved after this read (dataReceived)
            if sink is not None:
                sink.upstream_head(head, framing)
            if self._state != "body":
                return
            if framing.kind == "none":
                self._finish()
                return
            if framing.kind == "length":
                self._remaining = framing.length
                if self._remaining == 0:
                    self._finish()
                    return
            elif framing.kind == "chunked":
                self._decoder = http1.ChunkedDecoder()
            rest = bytes(self._buf)
            self._buf.clear()
            if rest:
                self._body(rest)
            return

    def _body(self, data: bytes) -> None:
        framing = self._framing
        sink = self.sink
        self._body_deadline_due = True
        if framing.kind == "length":
            if len(data) > self._remaining:
                # More than announced: deliver what was promised, never reuse this connection.
                self._keep_alive = False
                data = data[: self._remaining]
            self._remaining -= len(data)
            if sink is not None and data:
                sink.upstream_data(data)
            if self._remaining == 0:
                self._finish()
        elif framing.kind == "chunked":
            pieces = self._decoder.feed(data)
            if sink is not None:
                for piece in pieces:
                    sink.upstream_data(piece)
            if self._decoder.done:
                if self._decoder.take_rest():
                    self._keep_alive = False
                self._finish()
        else:  # read until the origin closes
            if sink is not None:
                sink.upstream_data(data)

    def _finish(self) -> None:
        sink, self.sink = self.sink, None
        self.requests_served += 1
        reusable = self._keep_alive and self._request_complete and not self._buf
        if reusable:
            # No deadline any more; the call stays where it is (a fire without one does nothing)
            # until the pool moves it to the idle deadline: one move instead of two.
            self._timer_info = None
        else:
            self._cancel_timer()
        self._state = "idle"
        if sink is not None:
            sink.upstream_done()
        if reusable and self._state == "idle":
            self.pool.release(self)
        elif self._state != "closed":
            self._state = "closed"
            self.transport.loseConnection()

    def _fail(self, failure: ProxyFailure) -> None:
        self._cancel_timer()
        sink, self.sink = self.sink, None
        self._state = "closed"
        self.transport.abortConnection()
        if sink is not None:
            sink.upstream_failed(failure, retryable=False)

    # -- timers ---------------------------------------------------------------------------
    def _restart_timer(self, seconds: float, error_type: str, detail: str) -> None:
        # One DelayedCall per connection, moved from phase to phase rather than replaced.
        self._timer_info = (error_type, detail, seconds)
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.pool.reactor.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        """No deadline for now: park the call far ahead (moving it later costs nothing)."""
        self._timer_info = None
        if self._timer is not None and self._timer.active():
            self._timer.reset(PARKED)

    def _drop_timer(self) -> None:
        self._timer_info = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        info, self._timer, self._timer_info = self._timer_info, None, None
        if info is None:
            return
        error_type, detail, seconds = info
        if error_type == "idle":
            if self._state == "idle":
                self._state = "closed"
                self.transport.loseConnection()
            return
        status = 504 if self._state == "head" else 502
        self._fail(ProxyFailure(status, error_type, f"{detail} ({seconds:g} s, {self.peer})"))

    def unread_bytes_waiting(self) -> bool:
        """Whether the origin sent something (or closed) that the reactor has not read yet.

        Late bytes that arrived in the same instant as a new request would otherwise be read
        as that request's response. One zero-timeout poll (proxy/peekready.py), on plain TCP only:
        a TLS connection legitimately receives records (session tickets) while idle, and they
        never surface as data.
        """
        if self.key[0] != "http":
            return False
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if not isinstance(sock, socket.socket):
            return False
        return readable_now(sock)  # poll(2): the peek's answer without its usual exception

    def go_idle(self) -> None:
        self._restart_timer(self.pool.limits.upstream_idle_timeout, "idle", "")


class _ConnectFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, pool: "UpstreamPool", key: PoolKey, peer: str) -> None:
        self.pool = pool
        self.key = key
        self.peer = peer
        self.deferred: defer.Deferred = defer.Deferred()

    def buildProtocol(self, addr):
        conn = UpstreamConnection(self.pool, self.key, self.peer)
        conn.factory = self
        return conn

    def connected(self, conn: UpstreamConnection) -> None:
        if not self.deferred.called:
            self.deferred.callback(conn)

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)


class UpstreamPool:
    """Idle keep-alive connections by (scheme, host, port), and how to make new ones."""

    def __init__(
        self,
        reactor: IReactorTCP | IReactorTime,
        resolver: Resolver,
        limits: Limits,
        *,
        is_self: Callable[[str, int], bool] = lambda ip, port: False,
    ) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.limits = limits
        self.is_self = is_self
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._tls_options: dict[str, object] = {}
        self.tls = None  # an intercept.upstream_tls.UpstreamTLS: verified origin TLS with precise errors
        self.connections_made = 0

    def take_idle(self, key: PoolKey) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if getattr(conn, "tls_tolerated", False) and not self.tls.tolerated(key[1]):
                # Its certificate was accepted only because the policy tolerated it; not any more.
                conn._state = "closed"
                conn.transport.loseConnection()
                continue
            if conn._state == "idle" and conn.transport is not None and conn.transport.connected:
                if conn.unread_bytes_waiting():
                    conn._state = "closed"
                    conn.transport.abortConnection()
                    continue
                conn._timer_info = None  # its idle deadline no longer applies; start_request sets the next
                return conn
        return None

    def connect(self, key: PoolKey) -> defer.Deferred:
        """A new connection to the origin named by key; fails with a ProxyFailure.

        Written as plain callbacks rather than a coroutine: one is made for every CONNECT tunnel
        and every new origin connection, and a generator driven by inlineCallbacks costs several
        times the calls below."""
        done: defer.Deferred = defer.Deferred()
        self.resolver.resolve(key[1]).addCallbacks(
            self._connect_next, done.errback, callbackArgs=(key, done, 0, None))
        return done

    def _connect_next(self, addresses, key: PoolKey, done: defer.Deferred, index: int,
                      last: ProxyFailure | None) -> None:
        """Try `addresses[index]`; after the last one, fail with the last address's reason."""
        scheme, host, port = key
        try:
            if index >= len(addresses):
                raise last or ProxyFailure(502, "destination_unavailable", f"no address for {host}")
            family, ip = addresses[index]
            if self.is_self(ip, port):
                raise ProxyFailure(508, "proxy_loop_detected", f"{host}:{port} is this proxy itself")
            peer = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            factory = _ConnectFactory(self, key, peer)
            timeout = self.limits.connect_timeout
            if scheme == "https" and self.tls is not None:
                self.tls.connect(self.reactor, ip, port, factory, host, timeout=timeout)
            elif scheme == "https":
                self.reactor.connectSSL(ip, port, factory, self._tls_for(host), timeout=timeout)
            else:
                self.reactor.connectTCP(ip, port, factory, timeout=timeout)
        except BaseException:
            done.errback(failure.Failure())
            return
        factory.deferred.addCallbacks(
            self._connected, self._connect_error, callbackArgs=(done,),
            errbackArgs=(addresses, key, done, index, peer, timeout))

    def _connected(self, conn: UpstreamConnection, done: defer.Deferred) -> None:
        self.connections_made += 1
        conn.connected_since = self.reactor.seconds()
        done.callback(conn)

    def _connect_error(self, reason, addresses, key: PoolKey, done: defer.Deferred, index: int, peer: str,
                       timeout: float) -> None:
        if reason.check(ProxyFailure):
            done.errback(reason)  # the origin answered, but its TLS cannot be trusted: no other address helps
            return
        if reason.check(error.ConnectionRefusedError):
            last = ProxyFailure(502, "connection_refused", f"{peer} refused the connection")
        elif reason.check(error.TimeoutError, error.TCPTimedOutError):
            last = ProxyFailure(504, "connection_timeout", f"connecting to {peer} took longer than {timeout:g} s")
        elif reason.check(error.ConnectError):
            e = reason.value
            last = ProxyFailure(502, "destination_unavailable", f"cannot connect to {peer}: {e.osError or e}")
        else:
            done.errback(reason)
            return
        self._connect_next(addresses, key, done, index + 1, last)

    def _tls_for(self, host: str):
        if self.tls is not None:
            return self.tls.creator_for(host)
        options = self._tls_options.get(host)
        if options is None:
            options = ssl.optionsForClientTLS(host)
            if len(self._tls_options) > 1000:
                self._tls_options.clear()
            self._tls_options[host] = options
        return options

    def release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.limits.upstream_idle_per_host:
            conn._state = "closed"
            conn.transport.loseConnection()
            return
        if conn.gate is not None:
            conn.gate.resume_all()
        if self.tls is not None and conn.key[0] == "https" and not getattr(conn, "tls_session_kept", True):
            conn.tls_session_kept = True  # once: its first response brought a TLS 1.3 ticket along
            self.tls.remember(conn.transport, conn.key[1], conn.key[2])
        idle.append(conn)
        conn.go_idle()

    def _forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def close_idle(self) -> None:
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn._state = "closed"
                conn.transport.loseConnection()
        self._idle.clear()

    @property
    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())
