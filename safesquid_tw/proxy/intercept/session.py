"""The front door's side of TLS inspection: bump or splice an allowed CONNECT, and the state of
one decrypted (inspected) client connection.

`Interceptor.take` is asked about every CONNECT the access rules allowed. When the
`tls_inspection` section says to inspect it, the node mints (or takes from the cache) a leaf for
the host, answers `200`, starts TLS on the same client transport and lets the connection go on
reading request heads, now decrypted: those requests take exactly the road of plain HTTP ones
(decision, content security, DLP, limits, records, error pages), with `https` as their scheme and
the tunnel's host as their authority. A CONNECT to an IP address is answered at once and the
ClientHello peeked at first (Squid's peek-and-splice), so the SNI can decide.
"""

from __future__ import annotations

import ipaddress
import weakref
from typing import TYPE_CHECKING

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from safesquid_tw.accesslog.record import AccessRecord
from safesquid_tw.policy.model import RequestFacts
from safesquid_tw.proxy import http1
from safesquid_tw.proxy.context import HeaderView
from safesquid_tw.proxy.intercept.clienthello import NotTLS, parse_client_hello
from safesquid_tw.proxy.intercept.fasttls import start_server_tls
from safesquid_tw.proxy.intercept.mint import LeafCache
from safesquid_tw.proxy.intercept.pinned import PinnedClients
from safesquid_tw.proxy.target import Target, _parse_authority, parse_target

if TYPE_CHECKING:
    from safesquid_tw.proxy.context import RequestContext
    from safesquid_tw.proxy.frontdoor import ClientConnection

log = Logger()

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
PEEK_LIMIT = 32 * 1024
_IP_LAST = frozenset("0123456789.")


def is_ip(host: str) -> bool:
    # Every CONNECT asks: a host name ends in a letter (no top-level domain is all digits) and
    # has no colon, so it is known without parsing (and raising) in `ipaddress`.
    if not host or (host[-1] not in _IP_LAST and ":" not in host):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    """`startTLS` with one ready-made context (the host's minted leaf): no per-handshake setup."""

    __slots__ = ("_ctx", "tls_factory")

    def __init__(self, ctx: SSL.Context) -> None:
        self._ctx = ctx
        self.tls_factory = None  # made by start_server_tls on first use, then reused

    def serverConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        return SSL.Connection(self._ctx, None)


class _CachedContextCreator(_ServerCreator):
    """A `_ServerCreator` that holds its context weakly: kept in `_CREATORS`, whose weak keys are
    the contexts, it must not keep its own key alive."""

    __slots__ = ("_ref",)

    def __init__(self, ctx: SSL.Context) -> None:
        super().__init__(None)
        self._ref = weakref.ref(ctx)

    def serverConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        return SSL.Connection(self._ref(), None)  # asked only while the caller holds the context


_CREATORS: "weakref.WeakKeyDictionary[SSL.Context, _CachedContextCreator]" = weakref.WeakKeyDictionary()


def _creator_for(ctx: SSL.Context) -> _ServerCreator:
    """One creator (with its TLS factory) per cached context, not one per tunnel: the leaf cache
    holds the context, and the creator goes when the context does (a new CA, an evicted host)."""
    creator = _CREATORS.get(ctx)
    if creator is None:
        creator = _CREATORS[ctx] = _CachedContextCreator(ctx)
    return creator


class TlsSession:
    """One inspected client connection: where its requests go and who its client is."""

    __slots__ = ("interceptor", "host", "port", "authority", "connect_ctx", "identity", "handshake_done",
                 "requests", "connect_recorded")

    def __init__(self, interceptor: "Interceptor", host: str, port: int, connect_ctx: "RequestContext", identity) -> None:
        self.interceptor = interceptor
        self.host = host
        self.port = port
        self.authority = Target("https", host, port, "/").authority().encode("ascii")
        self.connect_ctx = connect_ctx
        self.identity = identity  # from the CONNECT: browsers send no Proxy-Authorization inside
        self.handshake_done = False
        self.requests = 0
        self.connect_recorded = False

    # -- requests read from the decrypted stream ------------------------------------------
    def target_for(self, head: http1.RequestHead) -> Target:
        """The request's target: origin-form inside the tunnel (absolute-form naming the tunnel's
        own authority is accepted too); the Host field must name the tunnel's host (421 else:
        what was decided for the tunnel must be where the request goes, no domain fronting)."""
        raw = head.target
        if head.method == b"CONNECT":
            raise http1.ProtocolError(400, "CONNECT inside an inspected TLS tunnel")
        if raw[:1] == b"/":
            target = parse_target(head.method, b"https://" + self.authority + raw)
        else:
            target = parse_target(head.method, raw)
            if target.scheme != "https" or target.host != self.host or target.port != self.port:
                raise http1.ProtocolError(421, f"this TLS connection is for {self.host}:{self.port} only")
        hosts = head.get_all(b"host")
        if len(hosts) == 1:
            if hosts[0] == self.authority:
                return target  # the usual case, byte for byte: nothing to parse
            try:
                host, port, _userinfo = _parse_authority(hosts[0].strip(), 443)
            except http1.ProtocolError:
                raise http1.ProtocolError(400, "invalid Host header") from None
            if host != self.host or port != self.port:
                raise http1.ProtocolError(
                    421, f"this TLS connection is for {self.host}:{self.port}, not {host}:{port}")
        return target

    def request_started(self, conn: "ClientConnection", ctx: "RequestContext") -> None:
        ctx.tls = "inspected"
        if self.identity is not None:
            ctx.user = self.identity.user
            ctx.groups = self.identity.groups
        self.requests += 1
        if not self.connect_recorded:
            self._record_connect(conn, None)

    # -- the handshake and the end ----------------------------------------------------------
    def handshake_completed(self, conn: "ClientConnection") -> None:
        self.handshake_done = True
        self.interceptor.pinned.accepted(self.host)

    def connection_lost(self, conn: "ClientConnection", reason) -> None:
        if self.connect_recorded:
            return
        if not self.handshake_done:
            alert = _alert_text(reason)
            self.interceptor.pinned.rejected(self.host, conn.client_ip, alert)
            detail = f"the client rejected the inspection certificate ({alert})"
            log.info("TLS inspection: {client} rejected the certificate for {host}: {alert}",
                     client=conn.client_ip, host=self.host, alert=alert)
            self._record_connect(conn, detail, action="error")
        else:
            self._record_connect(conn, "no HTTP request inside the inspected TLS session", action="error")

    def rejected(self, conn: "ClientConnection", status: int, detail: str) -> None:
        """Bytes inside the TLS stream that are not an HTTP request: closed and recorded."""
        if not self.connect_recorded:
            self._record_connect(conn, None)
        record = AccessRecord(
            time=conn.factory.reactor.seconds(), node=conn.factory.node_name, client=conn.client_ip, user=None, method="-",
            url=f"https://{self.authority.decode('ascii')}/", status=status, bytes_in=0, bytes_out=0,
            duration_ms=0.0, action="error", rule=None, category=None, application=None,
            policy_version=self.connect_ctx.policy.version if self.connect_ctx.policy else None,
            detail=f"closed the inspected TLS session (not a valid HTTP request): {detail}", tls="inspected",
        )
        conn.factory.record_sink(record)

    def _record_connect(self, conn: "ClientConnection", detail: str | None, *, action: str = "allow") -> None:
        self.connect_recorded = True
        ctx = self.connect_ctx
        ctx.action = action
        if detail is not None:
            ctx.detail = detail
        conn.factory.record(conn, ctx)


def _alert_text(reason) -> str:
    err = getattr(reason, "value", None)
    if isinstance(err, SSL.Error) and err.args and isinstance(err.args[0], list):
        texts = [str(e[2]) for e in err.args[0] if isinstance(e, tuple) and len(e) == 3]
        if texts:
            return "; ".join(texts)
    return "closed during the TLS handshake"


class Interceptor:
    """Per proxy: the leaf cache, the pinned-client tally and the bump-or-splice decision."""

    def __init__(self, reactor, leaves: LeafCache, limits) -> None:
        self.reactor = reactor
        self.leaves = leaves
        self.limits = limits
        self.pinned = PinnedClients()
        self.bumped = 0
        self.spliced = 0

    @property
    def ready(self) -> bool:
        return self.leaves.ca is not None

    def take(self, conn: "ClientConnection", ctx: "RequestContext", identity) -> bool:
        """An allowed CONNECT: True when inspection took it over, False to splice it as before."""
        rules = ctx.policy.compiled.tls_inspection
        if not rules.enabled:
            ctx.tls = "bypassed"
            return False
        if not self.ready:
            # The policy wants inspection and there is no CA to do it with (a slave that has not
            # reached its master yet): refuse rather than let the tunnel through uninspected.
            conn._respond_error(ctx, 503, "TLS inspection is on, but this node has no inspection CA yet",
                                "destination_unavailable")
            return True
        host = ctx.target.host
        if is_ip(host):
            # Which site is behind an address only the ClientHello says: answer, then peek.
            ctx.status = 200
            conn.state = "peek"
            conn.peek = _Peek(identity)
            conn.write(ESTABLISHED)
            conn._arm("idle", self.limits.head_timeout)
            if conn.buf:
                data = bytes(conn.buf)
                conn.buf.clear()
                self.peeked(conn, data)
            return True
        return self._bump_or_splice(conn, ctx, host, identity, answered=False)

    def _choose(self, conn, compiled, host: str) -> tuple[bool, str | None]:
        """Bump (True) or splice this host's tunnel, and why."""
        rules = compiled.tls_inspection
        bump, why = rules.inspect(host, compiled.categories_of(host), conn.client_ip)
        if bump and rules.auto_bypass_pinned and self.pinned.auto_bypassed(host, rules.auto_bypass_pinned):
            bump, why = False, "auto-bypassed: clients reject the inspection certificate for this host"
        return bump, why

    def mode_for(self, conn: "ClientConnection", ctx: "RequestContext") -> str:
        """What an allowed CONNECT will become, for access rules matching on `tls`: `inspected` or
        `bypassed`. A CONNECT to an IP address is judged on the address (its SNI comes later,
        and a tunnel then spliced is decided again: `peeked`)."""
        compiled = ctx.policy.compiled
        if not compiled.tls_inspection.enabled:
            return "bypassed"
        if not self.ready:
            return "inspected"  # refused (503), never carried uninspected
        return "inspected" if self._choose(conn, compiled, ctx.target.host)[0] else "bypassed"

    def _bump_or_splice(self, conn, ctx, host: str, identity, *, answered: bool, extra_name: str | None = None) -> bool:
        bump, why = self._choose(conn, ctx.policy.compiled, host)
        if not bump:
            ctx.tls = "bypassed"
            self.spliced += 1
            if why and ctx.detail is None:
                ctx.detail = why
            return False
        self.bumped += 1
        ready = self.leaves.cached(host)
        if ready is not None:  # the usual case: the host's leaf and context are cached already
            conn.state = "waiting"
            self._start_tls(ready, conn, ctx, host, identity, answered, paused=False)
            return True
        conn.state = "waiting"
        conn.gate.pause("decision")
        d = self.leaves.context_for(host)
        d.addCallbacks(self._start_tls, self._mint_failed, callbackArgs=(conn, ctx, host, identity, answered),
                       errbackArgs=(conn, ctx, answered))
        return True

    def peeked(self, conn: "ClientConnection", data: bytes) -> None:
        """Bytes from a CONNECT to an IP address, before the decision: wait for the ClientHello."""
        peek = conn.peek
        peek.buf += data
        ctx = conn.ctx
        try:
            hello = parse_client_hello(bytes(peek.buf))
        except NotTLS as e:
            ctx.action = "error"
            ctx.tls = "inspected"
            ctx.detail = f"not TLS inside the tunnel ({e}): closed"
            conn.peek = None
            conn.state = "closing"
            conn.factory.record(conn, ctx)
            conn.ctx = None
            conn.transport.loseConnection()
            return
        if hello is None:
            if len(peek.buf) > PEEK_LIMIT:
                self.peeked_garbage(conn)
            return
        conn.peek = None
        buffered = bytes(peek.buf)
        host = hello.sni or ctx.target.host
        conn.buf[:0] = buffered
        if not self._bump_or_splice(conn, ctx, host, peek.identity, answered=True):
            if ctx.policy.compiled.uses_tls_condition and not self._spliced_allowed(conn, ctx, host, peek.identity):
                return
            conn.state = "waiting"
            conn._open_tunnel(ctx)

    def _spliced_allowed(self, conn: "ClientConnection", ctx: "RequestContext", host: str, identity) -> bool:
        """A CONNECT to an IP address that is to be spliced after its ClientHello, decided again by
        the access rules as `bypassed`, for the site its SNI names. Refused: recorded and closed
        (the `200` is sent already, and nothing can be said inside a TLS session not bumped)."""
        compiled = ctx.policy.compiled
        target = ctx.target
        facts = RequestFacts(
            client_ip=conn.client_ip, method="CONNECT", scheme=target.scheme, host=host, port=target.port,
            path=target.match_path, user=identity.user if identity is not None else None,
            groups=identity.groups if identity is not None else frozenset(),
            headers=HeaderView(ctx.head), tls="bypassed",
        )
        decision = compiled.decide(facts)
        if decision.action == "allow":
            return True
        ctx.action = "deny"
        ctx.rule = decision.rule
        ctx.category = decision.category
        ctx.detail = f"{decision.reason} (the ClientHello names {host}; the tunnel would not be inspected)"
        conn.state = "closing"
        conn.factory.record(conn, ctx)
        conn.ctx = None
        conn.transport.loseConnection()
        return False

    def peeked_garbage(self, conn) -> None:
        conn.state = "closing"
        conn.transport.loseConnection()

    def _start_tls(self, ssl_ctx: SSL.Context, conn: "ClientConnection", ctx: "RequestContext", host: str,
                   identity, answered: bool, paused: bool = True) -> None:
        if conn.state == "closing" or conn.transport is None:
            return
        if not answered:
            ctx.status = 200
            conn.write(ESTABLISHED)
        ctx.tls = "inspected"
        conn.tls_session = TlsSession(self, host, ctx.target.port, ctx, identity)
        conn.ctx = None
        conn.state = "head"
        rest = bytes(conn.buf)
        conn.buf.clear()
        conn.send_output_now()  # the 200 (held in this read's batch) leaves in clear, before TLS starts
        start_server_tls(conn.transport, _creator_for(ssl_ctx))
        conn._arm("idle", self.limits.head_timeout)  # the handshake gets as long as a request head
        if paused:
            conn.gate.resume("decision")
        if rest:
            conn.transport.protocol.dataReceived(rest)

    def _mint_failed(self, reason, conn: "ClientConnection", ctx: "RequestContext", answered: bool) -> None:
        log.failure("minting a certificate for {host}", reason, host=ctx.target.host)
        if conn.state == "closing" or conn.transport is None:
            return
        conn.gate.resume("decision")
        if answered:
            ctx.action, ctx.detail = "error", "no certificate could be minted"
            conn.factory.record(conn, ctx)
            conn.ctx = None
            conn.state = "closing"
            conn.transport.loseConnection()
            return
        conn._respond_error(ctx, 500, "no certificate could be minted for this host", "proxy_internal_error")


class _Peek:
    __slots__ = ("buf", "identity")

    def __init__(self, identity) -> None:
        self.buf = bytearray()
        self.identity = identity


__all__ = ["Interceptor", "TlsSession"]
