"""The proxy's front door: one protocol instance per client connection.

It reads request heads under strict framing rules and deadlines, applies the policy version that
is current when the head arrives (authentication, access rules, content and DLP checks), and then
answers itself (block pages, errors, 407, OPTIONS/TRACE at Max-Forwards 0), opens a CONNECT tunnel,
or hands the request to an `Exchange` that relays it to the origin. Requests on one connection are
answered strictly in order; pipelined requests wait in the buffer, and reading pauses when too much
is waiting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import error, protocol, threads
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer

from safesquid_tw.identity.errors import DirectoryUnavailable, NegotiateError
from safesquid_tw.identity.negotiate import negotiate_token
from safesquid_tw.policy.forwarding import rewrite as rewrite_forwarded
from safesquid_tw.policy.model import MISS, RequestFacts
from safesquid_tw.proxy import avscan, http1, leanpath
from safesquid_tw.proxy.answers import SelfAnswers
from safesquid_tw.proxy.context import HeaderView, RequestContext, basic_credentials
from safesquid_tw.proxy.directwrite import OutputBatch, write_now
from safesquid_tw.proxy.responses import ProxyFailure
from safesquid_tw.proxy.flow import ReadGate
from safesquid_tw.proxy.forward import Exchange
from safesquid_tw.proxy.headers import names_not_forwarded, via_contains
from safesquid_tw.proxy.bodyinspection import BodyInspection
from safesquid_tw.proxy.intercept.tlsmode import tls_mode
from safesquid_tw.proxy.target import host_header_for, is_asterisk_options, parse_target
from safesquid_tw.proxy.tunnel import Tunnel
from safesquid_tw.proxy.tunnelfast import close_now, open_tunnel
from safesquid_tw.proxy.urlnorm import blocked_request_any, strictest_decision

if TYPE_CHECKING:
    from safesquid_tw.proxy.service import ProxyFactory

log = Logger()

PARKED = 86400.0  # a deadline nobody needs right now waits here until it is moved again
PIPELINE_LIMIT = 256 * 1024  # bytes of pipelined requests buffered before reading pauses
_SET_BY_US = frozenset({b"host", b"content-length", b"max-forwards", b"expect"})  # in a forwarded request
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class ClientConnection(SelfAnswers, BodyInspection, protocol.Protocol):
    def __init__(self, factory: "ProxyFactory") -> None:
        self.factory = factory
        self.limits = factory.limits
        self.buf = bytearray()
        self.state = "head"  # head, hold, body, waiting, tunnel, closing
        self.gate: ReadGate | None = None
        self.exchange: Exchange | None = None
        self.ctx: RequestContext | None = None
        self.tunnel: Tunnel | None = None
        self.client_ip = "?"  # who the client is for the current request (see forwarding)
        self.peer_ip = "?"  # the connection's own client: PROXY header source or socket peer
        self.bytes_out = 0
        self._scanned = 0
        self._timer = None
        self._timer_kind = ""
        self._pumping = False
        self._body_remaining = 0
        self._body_total = 0
        self._decoder: http1.ChunkedDecoder | None = None
        self._dlp_buffer: bytearray | None = None
        self._dlp_scanning = False
        self._dlp_body_done = False
        self._upload_limit: int | None = None
        # (policy version, identity, principal) once Negotiate has authenticated this connection
        self._negotiated: tuple | None = None
        self._read_ended = False  # the client shut down its sending half before the tunnel opened
        self.tls_session = None  # a TlsSession once this connection is inspected (decrypted)
        self.peek = None  # while the ClientHello of a CONNECT to an IP address is awaited
        self.output = OutputBatch()  # a response head and its body read together leave in one send
        self._reading = False  # inside dataReceived with a batch of output open
        self._output_held = False  # the open batch waits for this turn's records (send_output)

    # -- connection lifetime --------------------------------------------------------------
    def connectionMade(self) -> None:
        self.gate = ReadGate(self.transport)
        self.peer_ip = self.client_ip = getattr(self.transport.getPeer(), "host", "?")
        if not self.factory.connection_opened(self):
            self.state = "closing"  # over the per-client limit: already closed
            return
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        # A new connection's first byte has its own, short deadline (a flood of silent sockets).
        self._arm("first", self.limits.first_byte_timeout)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._cancel_timer()
        self.state = "closing"
        if self.tunnel is not None:
            self.tunnel.side_closed("client")
        if self.exchange is not None:
            self.exchange.client_gone()
        if self.tls_session is not None:
            self.tls_session.connection_lost(self, reason)
        self.factory.connection_closed(self)

    def readConnectionLost(self) -> None:
        """The client shut down its sending half (TCP transports only call this)."""
        if self.state == "tunnel" and self.tunnel is not None:
            self.tunnel.client_eof()
            return
        if self.tunnel is not None and self.state == "waiting":
            # CONNECT still being set up: the bytes sent so far go through, then the end.
            self._read_ended = True
            return
        # Plain HTTP: as without half-close (Squid's half_closed_clients off): the connection ends.
        self.transport.connectionLost(failure.Failure(error.ConnectionDone()))

    def writeConnectionLost(self) -> None:
        pass  # our own loseWriteConnection in a tunnel completed; the other direction goes on

    def handshakeCompleted(self) -> None:
        """TLS with the client is up (an inspected tunnel)."""
        if self.tls_session is not None:
            self.tls_session.handshake_completed(self)

    def drain(self, quiet: float) -> None:
        """The node is stopping: answer what arrives within `quiet` seconds (or is in progress),
        then close. (The factory's draining flag closes the connection after its response.)"""
        if self.state == "head" and not self.buf and self._timer_kind in ("idle", "first", ""):
            if self._timer is not None and self._timer.active():
                self._timer_kind = "idle"
                self._timer.reset(min(quiet, self.limits.idle_timeout))
            else:
                self._arm("idle", min(quiet, self.limits.idle_timeout))

    def write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if not self.output.hold(data):
            write_now(self.transport, data)

    # -- timers ---------------------------------------------------------------------------
    def _arm(self, kind: str, seconds: float) -> None:
        # One DelayedCall per connection, moved rather than replaced: requests come and go
        # by the thousand per second, and moving a call is far cheaper than a new one.
        timer = self._timer
        if timer is not None and timer.active():
            if self._timer_kind != kind:
                self._timer_kind = kind
                timer.reset(seconds)
            return
        self._timer_kind = kind
        self._timer = self.factory.reactor.callLater(seconds, self._timed_out)

    def _disarm(self) -> None:
        """No deadline for now (a response is in progress). The call stays where it is: firing
        without a kind does nothing (`_timed_out`), and the next `_arm` moves it (or makes a new
        one if it fired meanwhile), so a request costs one move of it, not two."""
        self._timer_kind = ""

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_kind = ""

    def _timed_out(self) -> None:
        kind, self._timer, self._timer_kind = self._timer_kind, None, ""
        if kind == "idle":
            self.transport.loseConnection()
        elif kind == "first":
            self.factory.first_byte_timeouts += 1
            self.transport.loseConnection()
        elif kind == "head":
            # RFC 9110 15.5.9: 408 tells the client why its slow request went unanswered.
            self._reject(408, "the request head did not arrive in time", "http_request_error")
        elif kind == "body":
            self._reject(408, "the request body stalled", "http_request_error")

    # -- reading --------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == "tunnel":
            self.tunnel.from_client(data)
            return
        if state == "closing":
            return
        if state == "peek":
            self.factory.intercept.peeked(self, data)
            return
        # What this read makes us answer leaves in one send, after the records of the requests
        # it finished (see send_output).
        batching = self.output.begin(self.transport)
        self._reading = batching
        try:
            if state == "body" and not self.buf:
                self._body_bytes(data)
                if self.state != "body" and self.buf:
                    self._pump()
                return
            self.buf += data
            self._pump()
        finally:
            if batching:
                self._reading = False
                self.send_output()

    def records_due(self) -> None:
        """Write the records of the requests finished so far (before output leaves directly)."""
        self.factory.records_due()

    def send_output(self) -> None:
        """Send the open batch of output once the records of the requests finished so far are
        written: a client that saw its response end can count on its record. They are written at
        the end of this reactor turn with the turn's other records, in one write(2)
        (accesslog/spoolwriter.py); until then whatever this connection writes joins the batch."""
        if not self.output.pieces:
            self.output.end(self.transport)
        elif not self._output_held:
            self._output_held = True
            self.factory.after_records(self._release_output)

    def _release_output(self) -> None:
        if self._output_held:
            self._output_held = False
            self.output.end(self.transport)

    def send_output_now(self) -> None:
        """Send the open batch now, its records written first: before a close, TLS, or a tunnel
        that writes to the socket directly could overtake it."""
        if self.output.pieces:
            self.factory.records_due()
        self._output_held = False
        self.output.end(self.transport)

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                state = self.state
                if state == "head":
                    if not self.buf:
                        self._arm("idle", self.limits.idle_timeout)
                        return
                    if not self._read_head():
                        return
                elif state == "body":
                    if not self.buf:
                        return
                    data = bytes(self.buf)
                    self.buf.clear()
                    self._body_bytes(data)
                else:
                    if state == "waiting" and len(self.buf) > PIPELINE_LIMIT:
                        self.gate.pause("pipeline")
                    return
        except http1.ProtocolError as e:
            self._reject(e.status, e.detail, "http_request_error")
        finally:
            self._pumping = False

    def _read_head(self) -> bool:
        """Parse one request head from the buffer and act on it; False when more bytes are needed."""
        limits = self.limits
        end = http1.split_head(self.buf, limits.max_request_line, limits.max_header_bytes, self._scanned)
        if end < 0:
            self._scanned = len(self.buf)
            self._arm("head", limits.head_timeout)
            return False
        self._scanned = 0
        raw = bytes(self.buf[:end])
        del self.buf[:end]
        self._disarm()
        head = http1.parse_request_head(raw, limits.max_headers)
        self._handle(head, len(raw))
        return True

    def _body_bytes(self, data: bytes) -> None:
        """Request body bytes while state == 'body' (content-length or chunked framing)."""
        if self._decoder is None:
            n = self._body_remaining
            if len(data) > n:
                self.buf[:0] = data[n:]
                data = data[:n]
            self._body_remaining -= len(data)
            pieces = [data] if data else []
            finished = self._body_remaining == 0
        else:
            try:
                pieces = self._decoder.feed(data)
            except http1.ProtocolError as e:
                self._body_error(e.status, e.detail)
                return
            finished = self._decoder.done
            if finished:
                self.buf[:0] = self._decoder.take_rest()
        ctx = self.ctx
        for piece in pieces:
            size = len(piece)
            self._body_total += size
            ctx.bytes_in += size
            if self._body_total > self.limits.max_request_body:
                self._body_error(413, f"the request body is larger than {self.limits.max_request_body} bytes")
                return
            if self._upload_limit is not None and self._body_total > self._upload_limit:
                self._upload_blocked(ctx)
                return
            if self._dlp_buffer is not None:
                self._dlp_buffer += piece
                if len(self._dlp_buffer) >= ctx.policy.compiled.dlp.scan_limit and not self._dlp_scanning:
                    self._dlp_scan(ctx)
            else:
                self.exchange.body_data(piece)
        if self._timer_kind == "body":
            self._timer.reset(self.limits.read_timeout)
        if finished:
            self._disarm()
            self.state = "waiting"
            self._decoder = None
            if self._dlp_buffer is not None:
                self._dlp_body_done = True
                if not self._dlp_scanning:
                    self._dlp_scan(ctx)
                return
            self.exchange.body_end()

    def _body_error(self, status: int, detail: str) -> None:
        if self.exchange is not None:
            self.ctx.detail = detail
            self.exchange.fail(ProxyFailure(status, "http_request_error", detail))
        else:
            self._reject(status, detail, "http_request_error")

    # -- the request ----------------------------------------------------------------------
    def _handle(self, head: http1.RequestHead, head_size: int) -> None:
        factory = self.factory
        method = head.method
        if is_asterisk_options(method, head.target):
            self._answer_options(head)
            return
        tls_session = self.tls_session
        target = parse_target(method, head.target) if tls_session is None else tls_session.target_for(head)
        hosts = head.values(b"host") or ()
        if len(hosts) > 1 or (not hosts and head.version == b"HTTP/1.1"):
            # RFC 9112 3.2: exactly one Host in HTTP/1.1; two would let two parsers disagree.
            raise http1.ProtocolError(400, "an HTTP/1.1 request needs exactly one Host header")
        framing = http1.request_framing(head)
        if framing.kind == "length" and framing.length > self.limits.max_request_body:
            raise http1.ProtocolError(413, f"the request body is larger than {self.limits.max_request_body} bytes")
        policy = factory.current_policy()
        ctx = RequestContext(self.factory.reactor.seconds(), head, target, policy, framing)
        ctx.bytes_in = head_size
        self.ctx = ctx
        self.state = "hold"
        if tls_session is not None:
            tls_session.request_started(self, ctx)
        if policy is None:
            self._respond_error(ctx, 503, "this node has no policy yet", "destination_unavailable", template="nopolicy")
            return
        if head.has(b"via") and via_contains(head.headers, factory.pseudonym):
            self._respond_error(ctx, 508, "this request has passed through this proxy before", "proxy_loop_detected")
            return
        if method in (b"OPTIONS", b"TRACE"):
            max_forwards = head.get(b"max-forwards")
            if max_forwards is not None and max_forwards.strip() == b"0":
                self._answer_max_forwards(ctx, head)
                return
        compiled = policy.compiled
        self.client_ip = compiled.forwarding.identity(self.peer_ip, head)
        if tls_session is not None:
            # Authenticated (or not) with the CONNECT: nothing inside a tunnel carries credentials.
            self._decide(ctx, tls_session.identity)
            return
        if compiled.auth_required(self.client_ip):
            authorization = head.get(b"proxy-authorization")
            if compiled.negotiate and factory.negotiate is not None:
                if self._negotiate(ctx, compiled, authorization):
                    return
            credentials = basic_credentials(authorization)
            if credentials is None:
                self._challenge(ctx)
                return
            cached = compiled.cached_identity(*credentials)
            if cached is not MISS:
                self._verified(cached, ctx)
                return
            # argon2 is deliberately slow: verify off the reactor thread, reading nothing more
            # from this client meanwhile. (The usual path decides at once and never pauses:
            # pausing costs two system calls per request.)
            self.gate.pause("decision")
            d = threads.deferToThreadPool(
                factory.reactor, factory.auth_pool, compiled.verify_credentials, *credentials
            )
            d.addCallbacks(self._verified, self._verify_failed, callbackArgs=(ctx,), errbackArgs=(ctx,))
            return
        self._decide(ctx, None)

    def _verified(self, identity, ctx: RequestContext) -> None:
        if self.ctx is not ctx or self.state == "closing":
            return
        brake = self.factory.guessing
        if identity is None:
            ctx.detail = "wrong user name or password"
            delay = brake.failed(self.client_ip)
            if delay:
                self.gate.pause("decision")
                self.factory.reactor.callLater(delay, self._challenge_later, ctx)
            else:
                self._challenge(ctx)
        else:
            brake.succeeded(self.client_ip)
            self._authenticated(ctx, identity)

    def _challenge_later(self, ctx: RequestContext) -> None:
        if self.ctx is ctx and self.state != "closing":
            self._challenge(ctx)

    def _verify_failed(self, reason, ctx: RequestContext) -> None:
        if self.ctx is not ctx or self.state == "closing":
            return
        if reason.check(DirectoryUnavailable):
            # Never a silent allow: users the directory has not vouched for recently wait outside.
            self.factory.log_directory_down(str(reason.value))
            self._respond_error(ctx, 503, "the user directory is unavailable; try again shortly",
                                "proxy_internal_error")
            return
        log.failure("verifying proxy credentials", reason)
        self._respond_error(ctx, 500, "the credentials could not be checked", "proxy_internal_error")

    # -- Kerberos (Negotiate) ---------------------------------------------------------------
    def _negotiate(self, ctx: RequestContext, compiled, authorization: bytes | None) -> bool:
        """Handle a Negotiate token, or a connection Negotiate already authenticated; True when
        this request is taken care of here (decided, or waiting on a worker thread)."""
        token = negotiate_token(authorization)
        if token is None:
            known = self._negotiated
            if known is None or authorization is not None:
                return False
            # Negotiate authenticates the connection (RFC 4559 4.2): later requests on it carry
            # no token. The identity is looked up again under a newer policy version.
            if known[0] is compiled:
                self._authenticated(ctx, known[1])
                return True
            token_principal = known[2]
            self.gate.pause("decision")
            d = threads.deferToThreadPool(self.factory.reactor, self.factory.auth_pool,
                                          _principal_identity, compiled, None, token_principal)
        else:
            self.gate.pause("decision")
            d = threads.deferToThreadPool(self.factory.reactor, self.factory.auth_pool,
                                          _principal_identity, compiled, self.factory.negotiate, token)
        d.addCallbacks(self._negotiated_identity, self._negotiate_failed,
                       callbackArgs=(ctx, compiled), errbackArgs=(ctx,))
        return True

    def _negotiated_identity(self, result, ctx: RequestContext, compiled) -> None:
        if self.ctx is not ctx or self.state == "closing":
            return
        principal, identity, reply = result
        if identity is None:
            ctx.detail = f"Kerberos principal {principal} is not in the directory"
            self._negotiated = None
            self._challenge(ctx)
            return
        # (The acceptor's mutual-authentication token is not relayed: proxy clients do not ask
        # for it, and it would have to be spliced into the origin's response head.)
        self._negotiated = (compiled, identity, principal)
        self._authenticated(ctx, identity)

    def _negotiate_failed(self, reason, ctx: RequestContext) -> None:
        if self.ctx is not ctx or self.state == "closing":
            return
        if reason.check(NegotiateError):
            ctx.detail = f"Negotiate: {reason.value}"
            self._negotiated = None
            self._challenge(ctx)
            return
        self._verify_failed(reason, ctx)

    def _authenticated(self, ctx: RequestContext, identity) -> None:
        ctx.user = identity.user
        ctx.groups = identity.groups
        self._decide(ctx, identity)

    def _decide(self, ctx: RequestContext, identity) -> None:
        compiled = ctx.policy.compiled
        target = ctx.target
        head = ctx.head
        method = head.method.decode("ascii")
        user = identity.user if identity is not None else None
        groups = identity.groups if identity is not None else frozenset()
        tls = tls_mode(self, ctx) if compiled.uses_tls_condition else None
        # A repeat of a decision that read no header and no time needs no facts (policy/compiled.py).
        decision = compiled.known_decision(target.host, method, target.port, self.client_ip, user, groups, tls,
                                           target.scheme, target.match_path)
        if decision is None or target.other_paths:
            facts = RequestFacts(
                client_ip=self.client_ip,
                method=method,
                scheme=target.scheme,
                host=target.host,
                port=target.port,
                path=target.match_path,
                user=user,
                groups=groups,
                headers=HeaderView(head),
                now=ctx.start,  # schedules read the reactor's clock, not the wall's
                tls=tls,
            )
            if decision is None:
                decision = compiled.decide(facts)
            if target.other_paths and decision.action == "allow":
                decision = strictest_decision(compiled, facts, target.other_paths, decision)
        ctx.rule = decision.rule
        ctx.category = decision.category
        ctx.application = decision.application
        if decision.action != "allow":
            ctx.action = "deny"
            self.respond_blocked(ctx, rule=decision.rule, reason=decision.reason, close=self._must_close(ctx))
            self._finish_local(ctx)
            return
        if head.method == b"CONNECT":
            if target.port not in compiled.connect_ports:
                ctx.action = "deny"
                ctx.rule = "connect-ports"
                self.respond_blocked(
                    ctx, rule="connect-ports", reason=f"tunnels to port {target.port} are not allowed",
                    close=self._must_close(ctx),
                )
                self._finish_local(ctx)
                return
            intercept = self.factory.intercept
            if intercept is not None and intercept.take(self, ctx, identity):
                return
            self._open_tunnel(ctx)
            return
        content = compiled.content
        reason = blocked_request_any(content, target)
        if reason is not None:
            ctx.action = "deny"
            ctx.rule = "content-security"
            self.respond_blocked(ctx, rule="content-security", reason=reason, close=self._must_close(ctx))
            self._finish_local(ctx)
            return
        framing = ctx.framing
        self._upload_limit = content.max_upload
        if (
            framing.kind == "length"
            and content.max_upload is not None
            and framing.length > content.max_upload
        ):
            self._upload_blocked(ctx)
            return
        dlp = compiled.dlp
        query_at = target.path.find("?")
        if query_at >= 0 and dlp.scans_bodies:
            if not self._apply_dlp(ctx, dlp.scan(target.path[query_at + 1 :].encode("utf-8", "replace"))):
                return
        self._forward(ctx)

    def _forward(self, ctx: RequestContext) -> None:
        lean_head = leanpath.request_head(self, ctx)
        if lean_head is not None:
            # A common request (proxy/leanpath.py): no body, nothing to upgrade or expect.
            exchange = self.exchange = Exchange(self, ctx, lean_head, body=False)
            self.state = "waiting"
            exchange.start()
            self.gate.resume("decision")
            if self.buf and not self._pumping:
                self._pump()
            return
        head = ctx.head
        target = ctx.target
        compiled = ctx.policy.compiled
        framing = ctx.framing
        body = framing.kind != "none"
        # Only WebSocket is tunnelled after a 101: other upgrades (h2c...) would carry protocols
        # this proxy cannot inspect, so the Upgrade header is dropped like any hop-by-hop field.
        upgrade_value = head.get(b"upgrade")
        upgrade = (
            upgrade_value is not None
            and upgrade_value.strip().lower() == b"websocket"
            and head.method == b"GET"
            and not body
        )
        scan_body = body and compiled.dlp.scans_bodies
        av_upload = body and avscan.holds_uploads(ctx)  # held for a virus scan before the origin
        expect = head.get(b"expect")
        if expect is not None and expect.lower() != b"100-continue":
            self._respond_error(ctx, 417, "only the 100-continue expectation is supported", "http_request_error")
            return
        # Hop-by-hop fields and those set below are left out in one pass. Field names with "_"
        # are dropped: CGI-style origins read X_Forwarded_For or Remote_User as the
        # X-Forwarded-For / Remote-User the proxy vouches for (nginx's default too).
        drop = names_not_forwarded(head.values(b"connection"), keep_upgrade=upgrade, also=_SET_BY_US)
        headers = [(n, v) for n, v in head.headers if n.lower() not in drop and b"_" not in n]
        headers.insert(0, (b"Host", host_header_for(target)))
        max_forwards = head.get(b"max-forwards")
        if max_forwards is not None and head.method in (b"OPTIONS", b"TRACE"):
            try:
                headers.append((b"Max-Forwards", b"%d" % max(int(max_forwards) - 1, 0)))
            except ValueError:
                pass
        elif max_forwards is not None:
            headers.append((b"Max-Forwards", max_forwards))
        if expect is not None and not scan_body and not av_upload:
            headers.append((b"Expect", b"100-continue"))
        forwarding = compiled.forwarding
        headers = rewrite_forwarded(headers, forwarding.mode, self.peer_ip, self.client_ip)
        headers = self.factory.add_via(headers, head.version)
        if framing.kind == "length":
            headers.append((b"Content-Length", b"%d" % framing.length))
        elif framing.kind == "chunked":
            headers.append((b"Transfer-Encoding", b"chunked"))
        if upgrade:
            headers.append((b"Connection", b"upgrade"))
        upstream_head = http1.serialize_request_head(head.method, target.path.encode("ascii", "replace") or b"/", headers)
        exchange = Exchange(self, ctx, upstream_head, body=body)
        exchange.upgrade = upgrade
        self.exchange = exchange
        if body:
            self._body_total = 0
            self._decoder = http1.ChunkedDecoder() if framing.kind == "chunked" else None
            self._body_remaining = framing.length if framing.kind == "length" else 0
            self.state = "body"
            self._arm("body", self.limits.read_timeout)
            if scan_body:
                self._dlp_buffer = bytearray()
                self._dlp_scanning = self._dlp_body_done = False
                if expect is not None and ctx.version == b"HTTP/1.1":
                    # The body must be scanned before anything goes upstream: ask for it ourselves.
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                exchange.start()
                if av_upload and expect is not None and ctx.version == b"HTTP/1.1" and self.state == "body":
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the body is held here, not at the origin
        else:
            self.state = "waiting"
            exchange.start()
        self.gate.resume("decision")
        if self.buf and not self._pumping:
            # Decided asynchronously (credentials checked in a thread): body bytes that arrived
            # meanwhile are waiting in the buffer.
            self._pump()

    # -- CONNECT --------------------------------------------------------------------------
    def _open_tunnel(self, ctx: RequestContext) -> None:
        self.state = "waiting"
        tunnel = open_tunnel(self, ctx)
        self.tunnel = tunnel
        tunnel.open()

    def tunnel_ready(self, tunnel: Tunnel) -> None:
        if self.ctx.status != 200:  # a peeked tunnel (CONNECT to an IP) was answered before
            self.ctx.status = 200
            if not self.output.pieces:
                # Nothing this connection answered before waits in a batch, so no record is
                # owed before the 200: it leaves at once, without writing the turn's records.
                self.bytes_out += len(_ESTABLISHED)
                write_now(self.transport, _ESTABLISHED)
            else:
                self.write(_ESTABLISHED)
                self.send_output_now()  # before the tunnel's direct writes
        self.state = "tunnel"
        rest = bytes(self.buf)
        self.buf.clear()
        self.gate.resume("decision")
        if rest:
            tunnel.from_client(rest)
        if self._read_ended:
            tunnel.client_eof()

    def tunnel_failed(self, tunnel: Tunnel, failure: ProxyFailure) -> None:
        ctx = self.ctx
        self.tunnel = None
        ctx.action = "error"
        ctx.detail = failure.detail
        self.factory.log_upstream_error(ctx, failure)
        self.respond_failure(ctx, failure)
        self._finish_local(ctx, close=True)

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        ctx = self.ctx
        ctx.bytes_in += tunnel.bytes_from_client
        self.bytes_out += tunnel.bytes_to_client
        self.factory.record(self, ctx, tunnel_bytes=(tunnel.bytes_from_client, tunnel.bytes_to_client))
        self.tunnel = None
        self.ctx = None
        self.state = "closing"
        if not close_now(self.transport):  # (nothing queued: closed at once, see tunnelfast)
            self.transport.loseConnection()

    def switch_to_tunnel(self, exchange: Exchange, upstream) -> None:
        """A 101 answer to an Upgrade request: from now on bytes flow unchanged both ways."""
        self.send_output_now()  # the 101 head first: the tunnel writes to the socket directly
        self.exchange = None
        tunnel = Tunnel(self, self.ctx)
        self.tunnel = tunnel
        self.state = "tunnel"
        self._disarm()
        tunnel.adopt(upstream)
        rest = bytes(self.buf)
        self.buf.clear()
        self.gate.resume_all()
        if rest:
            tunnel.from_client(rest)

    # -- endings --------------------------------------------------------------------------
    def _finish_local(self, ctx: RequestContext, *, close: bool | None = None) -> None:
        """A request the proxy answered itself is complete."""
        if close is None:
            close = self._must_close(ctx)
        self.factory.record(self, ctx)
        self.ctx = None
        self.exchange = None
        self._dlp_buffer = None
        self._after_response(close=close, abort=False)

    def exchange_finished(self, exchange: Exchange, *, close: bool, abort: bool) -> None:
        if self.exchange is exchange:
            self.exchange = None
        ctx = self.ctx
        if ctx is not None:
            self.factory.record(self, ctx)
            self.ctx = None
        if self.state in ("body", "hold"):
            close = True  # the response ended before the request body was read
        self._after_response(close=close, abort=abort)

    def _after_response(self, *, close: bool, abort: bool) -> None:
        # The response is complete. It leaves with this turn's records, and at once before a
        # close; a next request that switches this connection to TLS sends it first itself.
        factory = self.factory
        if close or factory.draining or factory.closing or self.state == "closing":
            self.send_output_now()
        else:
            self.send_output()
        if self._reading and self.transport is not None:
            self.output.begin(self.transport)  # a pipelined request's answer: held in turn
        self._dlp_buffer = None
        self._dlp_scanning = self._dlp_body_done = False
        self._decoder = None
        if self.state == "closing" or self.transport is None:
            return
        if close or factory.draining or factory.closing:
            self.state = "closing"
            self._disarm()
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
            return
        self.state = "head"
        self.gate.resume_all()
        self._arm("idle", self.limits.idle_timeout)
        if self.buf and not self._pumping:
            self._pump()


def _principal_identity(compiled, acceptor, token_or_principal):
    """In a worker thread: accept a SPNEGO token (when `acceptor` is given) or take a principal
    already accepted on this connection, and find its identity under `compiled`."""
    reply = None
    if acceptor is not None:
        accepted = acceptor.accept(token_or_principal)
        principal, reply = accepted.principal, accepted.reply
    else:
        principal = token_or_principal
    user = principal.rpartition("@")[0] or principal
    return principal, compiled.principal_identity(user, principal), reply
