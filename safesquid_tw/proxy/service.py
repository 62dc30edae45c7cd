"""The forward proxy as a service: its listening port, its connections, its upstream pool."""

from __future__ import annotations

import ipaddress
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from safesquid_tw.accesslog.record import AccessRecord
from safesquid_tw.config import Limits
from safesquid_tw.proxy import fastdispatch, leanaccept
from safesquid_tw.proxy.counters import ProxyCounters
from safesquid_tw.icap.scanner import Scanner
from safesquid_tw.proxy.responses import ProxyFailure, error_response, proxy_status_value
from safesquid_tw.proxy.context import RequestContext
from safesquid_tw.proxy.frontdoor import ClientConnection
from safesquid_tw.proxy.guessing import GuessingBrake
from safesquid_tw.proxy.headers import append_via
from safesquid_tw.proxy.proxyheader import ProxyHeaderFactory, parse_networks, split_endpoint
from safesquid_tw.proxy.resolver import Resolver
from safesquid_tw.proxy.tunnelfast import TunnelSweep
from safesquid_tw.proxy.upstream import UpstreamPool

log = Logger()

DRAIN_GRACE = 10.0  # seconds in-flight requests get to finish when the node stops
STOP_QUIET = 1.0  # seconds an idle connection gets at stop to send a request already on its way


class _Refuse(protocol.Protocol):
    """Past the connection cap: say so and close, rather than leave the client hanging."""

    def __init__(self, node: str) -> None:
        self.node = node

    def connectionMade(self) -> None:
        self.transport.write(
            error_response(503, node=self.node, detail="the proxy is at its connection limit; try again shortly",
                           error_type="connection_limit_reached")
        )
        self.transport.loseConnection()


class ProxyFactory(protocol.Factory):
    noisy = False

    def __init__(
        self,
        *,
        reactor,
        limits: Limits,
        node_name: str,
        current_policy: Callable[[], object],
        record_sink: Callable[[AccessRecord], None],
        resolver: Resolver,
        negotiate=None,
    ) -> None:
        self.reactor = reactor
        self.negotiate = negotiate  # a NegotiateAcceptor when the node has a keytab
        self._directory_logged_at = -1e9
        self.limits = limits
        self.node_name = node_name
        self.pseudonym = node_name.encode("ascii", "replace").replace(b" ", b"-") or b"safesquid-tw"
        self._via_value = b"safesquid-tw"
        self.current_policy = current_policy
        self.record_sink = record_sink
        # Called before a batch of response bytes leaves straight for a client socket: writes
        # the records of requests finished so far (the spool writer's `write_due`), for output
        # that must leave now (before a close or TLS) ...
        self.records_due: Callable[[], None] = _nothing
        # ... and, for the rest, sends it once they are written with the turn's other records
        # (the spool writer's `after_records`).
        self.after_records: Callable[[Callable[[], None]], None] = _at_once
        self.connections: set[ClientConnection] = set()
        self.listening: list[tuple[str, int]] = []
        self.draining = False  # no new connections: refused with 503
        self.closing = False  # every connection closes after its current response
        self.pool = UpstreamPool(reactor, resolver, limits, is_self=self.is_self)
        self.auth_pool = ThreadPool(minthreads=0, maxthreads=4, name="safesquid-auth")
        self.requests = 0
        self.counters = ProxyCounters()  # read by the metrics collector at scrape time
        self.guessing = GuessingBrake()
        self.intercept = None  # an intercept.session.Interceptor when this node inspects TLS
        self._status_cache: dict[str, bytes] = {}
        # Edge counters (plain attributes: /health and metrics read them).
        self.proxy_header_invalid = 0  # haproxy: listeners: missing, malformed or late PROXY header
        self.proxy_peer_refused = 0  # haproxy: listeners: a peer outside --proxy-protocol-from
        self.per_client_refused = 0  # over --max-connections-per-client
        self.first_byte_timeouts = 0  # no first request byte within --first-byte-timeout
        self.per_client: dict[str, int] = {}  # open connections per client address
        self._limit_logged = float("-inf")
        self.antivirus = Scanner(reactor)  # ICAP services of the policy's antivirus section
        self.node_counts = None  # in a worker: the node's shared connection counts (workers/limits.py)
        self.tunnel_sweep = TunnelSweep(reactor, limits)  # connect and idle deadlines of CONNECT tunnels

    def buildProtocol(self, addr):
        shared = self.node_counts
        if (len(self.connections) if shared is None else shared.total()) >= self.limits.max_connections \
                or self.draining:
            refuse = _Refuse(self.node_name)
            refuse.factory = self
            return refuse
        return ClientConnection(self)

    def connection_opened(self, conn: ClientConnection) -> bool:
        """Admit a new connection, or close it at once when its address has too many open."""
        ip = conn.peer_ip
        if self.node_counts is not None:
            return self._opened_node_wide(conn, ip)
        count = self.per_client.get(ip, 0)
        if count >= self.limits.max_connections_per_client and ip != "?":
            self._refuse_over_limit(conn, ip, count)
            return False
        self.per_client[ip] = count + 1
        self.connections.add(conn)
        return True

    def _opened_node_wide(self, conn: ClientConnection, ip: str) -> bool:
        """In a worker: the client's connections on every worker of the node count."""
        over = self.node_counts.open(ip, self.limits.max_connections_per_client if ip != "?" else 1 << 30)
        if over is not None:
            self._refuse_over_limit(conn, ip, over)
            return False
        self.connections.add(conn)
        return True

    def _refuse_over_limit(self, conn: ClientConnection, ip: str, count: int) -> None:
        self.per_client_refused += 1
        now = self.reactor.seconds()
        if now - self._limit_logged >= 10.0:  # a flood must not flood the event log too
            self._limit_logged = now
            log.warn("closed a connection from {client}: it has {count} open (--max-connections-per-client); "
                     "{total} closed so far", client=ip, count=count, total=self.per_client_refused)
        conn.transport.loseConnection()

    def connection_closed(self, conn: ClientConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            ip = conn.peer_ip
            if self.node_counts is not None:
                self.node_counts.close(ip)
                return
            count = self.per_client.get(ip, 1) - 1
            if count > 0:
                self.per_client[ip] = count
            else:
                self.per_client.pop(ip, None)

    def edge_counters(self) -> dict[str, int]:
        """Connections closed at the edge, by reason (for /health and metrics)."""
        return {
            "proxy_header_invalid": self.proxy_header_invalid,
            "proxy_peer_refused": self.proxy_peer_refused,
            "per_client_refused": self.per_client_refused,
            "first_byte_timeouts": self.first_byte_timeouts,
        }

    # -- helpers for the connections ------------------------------------------------------
    def add_via(self, headers, version: bytes) -> list:
        return append_via(headers, version, self.pseudonym)

    def proxy_status(self, error_type: str) -> bytes:
        value = self._status_cache.get(error_type)
        if value is None:
            value = self._status_cache[error_type] = proxy_status_value(self.node_name, error_type)
        return value

    def is_self(self, ip: str, port: int) -> bool:
        """Would connecting to ip:port reach this proxy's own listening socket?"""
        for host, listen_port in self.listening:
            if port != listen_port:
                continue
            if host == ip:
                return True
            addr = ipaddress.ip_address(ip)
            if host in ("0.0.0.0", "::") and (addr.is_loopback or addr.is_unspecified):
                return True
            if addr.is_unspecified:
                return True
        return False

    def log_directory_down(self, why: str) -> None:
        """One line per half minute while the directory does not answer, not one per request."""
        now = self.reactor.seconds()
        if now - self._directory_logged_at >= 30.0:
            self._directory_logged_at = now
            log.warn("the user directory is unavailable ({why}); new logins get 503 until it answers",
                     why=why)

    def record(self, conn: ClientConnection, ctx: RequestContext, tunnel_bytes=None) -> None:
        self.requests += 1
        now = self.reactor.seconds()
        policy = ctx.policy
        bytes_out = conn.bytes_out if tunnel_bytes is None else tunnel_bytes[1]
        self.counters.count_request(ctx.action, ctx.status, now - ctx.start, ctx.bytes_in, bytes_out)
        record = AccessRecord(
            time=ctx.start,
            node=self.node_name,
            client=conn.client_ip,
            user=ctx.user,
            groups=tuple(sorted(ctx.groups)) if ctx.groups else (),
            method=ctx.method.decode("ascii", "replace"),
            url=ctx.url,
            status=ctx.status,
            bytes_in=ctx.bytes_in,
            bytes_out=bytes_out,
            duration_ms=(now - ctx.start) * 1000.0,
            action=ctx.action,
            rule=ctx.rule,
            category=ctx.category,
            application=ctx.application,
            policy_version=policy.version if policy is not None else None,
            dlp=ctx.dlp,
            detail=ctx.detail,
            transfer=ctx.transfer,
            tls=ctx.tls,
        )
        conn.bytes_out = 0
        self.record_sink(record)

    def log_upstream_error(self, ctx: RequestContext, failure: ProxyFailure) -> None:
        self.counters.upstream_failed(failure.error_type)
        log.warn(
            "upstream error for {method} {url}: {status} {error_type}: {detail}",
            method=ctx.method.decode("ascii", "replace"), url=ctx.url, status=failure.status,
            error_type=failure.error_type, detail=failure.detail,
        )

    def log_rejected(self, conn: ClientConnection, status: int, detail: str, ctx: RequestContext | None) -> None:
        log.info("rejected a request from {client}: {status} {detail}", client=conn.client_ip, status=status, detail=detail)
        if ctx is not None:
            ctx.status = status
            ctx.action = "error"
            ctx.detail = detail
            self.record(conn, ctx)
            conn.ctx = None


class ProxyService(Service):
    """Listens on the proxy endpoint; on stop, lets requests in flight finish (bounded)."""

    name = "proxy"

    def __init__(self, reactor, endpoint: str | tuple[str, ...], factory: ProxyFactory, resolver: Resolver,
                 *, stop_grace: float = 0.0, proxy_protocol_from: str | None = None, drain_grace: float = 10.0,
                 state=None) -> None:
        self.stop_grace = stop_grace
        self.drain_grace = drain_grace  # a drain task: seconds before new connections are refused
        self.state = state  # the NodeState whose `draining` /health reports, if any
        self._drain_call = None
        self.reactor = reactor
        self.endpoints = (endpoint,) if isinstance(endpoint, str) else tuple(endpoint)
        self.endpoint = self.endpoints[0]
        self.factory = factory
        self.resolver = resolver
        self.proxy_protocol_from = proxy_protocol_from
        self.port = None
        self.ports: list = []
        # One Deferred per listener, in --listen order; `listening` is the first one's.
        self.listening_each: list[defer.Deferred] = [defer.Deferred() for _ in self.endpoints]
        self.listening: defer.Deferred = self.listening_each[0]

    def startService(self) -> None:
        super().startService()
        fastdispatch.install(self.reactor)  # read events without the per-event log context
        self.resolver.start()
        self.factory.auth_pool.start()
        allowed = parse_networks(self.proxy_protocol_from) if self.proxy_protocol_from else None
        for description, done in zip(self.endpoints, self.listening_each):
            proxied, inner = split_endpoint(description)
            # Every listener gets the same factory, so the limits count all of them together.
            factory = self.factory
            if proxied:
                factory = ProxyHeaderFactory(self.factory, reactor=self.reactor, allowed=allowed,
                                             timeout=self.factory.limits.first_byte_timeout)
            ep = endpoints.serverFromString(self.reactor, with_backlog(inner))
            ep.listen(factory).addCallbacks(self._listening, done.errback, callbackArgs=(done, proxied))

    def _listening(self, port, done: defer.Deferred, proxied: bool) -> None:
        if self.port is None:
            self.port = port
        leanaccept.install(port)  # accept without Twisted's per-connection extras
        self.ports.append(port)
        host = port.getHost()
        self.factory.listening.append((host.host, host.port))
        log.info("proxy listening on {host}:{port}{kind}", host=host.host, port=host.port,
                 kind=" (PROXY protocol)" if proxied else "")
        done.callback(port)

    # -- drain and resume (the master's tasks; also the first steps of a stop) ---------------
    def drain(self) -> str:
        """Leave the load balancer's rotation: /health says 503 at once, every connection closes
        after its current response, and after `drain_grace` new connections are refused while
        requests in flight finish. `resume` undoes it."""
        if self.state is not None:
            self.state.draining = True
        self.factory.closing = True  # keep-alive clients reconnect (elsewhere) after each response
        self._cancel_drain_call()
        self._drain_call = self.reactor.callLater(self.drain_grace, self._refuse_new)
        log.info("draining: /health says 503; new connections refused in {grace} s", grace=self.drain_grace)
        return f"draining; new connections refused in {self.drain_grace:g} s"

    def resume(self) -> str:
        if self.state is not None:
            self.state.draining = False
        self._cancel_drain_call()
        self.factory.draining = False
        self.factory.closing = False
        log.info("resumed: taking traffic again")
        return "resumed"

    def _cancel_drain_call(self) -> None:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None

    def _refuse_new(self) -> None:
        self._drain_call = None
        self.factory.draining = True
        for conn in list(self.factory.connections):
            conn.drain(1.0)
        log.info("drained: new connections are refused, requests in flight finish")

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        self._cancel_drain_call()
        factory = self.factory
        # First the grace: /health already says 503, load balancers move clients away, and
        # every connection closes after its next response, all while everything is still served.
        factory.closing = True
        if self.stop_grace > 0:
            yield _sleep(self.reactor, self.stop_grace)
        factory.draining = True
        if self.ports:
            # New connections are refused from here on (a load balancer retries those elsewhere).
            yield defer.gatherResults([port.stopListening() for port in self.ports])
        # Connections already accepted may carry a request that is on its way (a load balancer
        # just opened one, a client just reused one): each gets a moment to send it, is answered,
        # and then closes. Closing them at once would lose such a request with no answer at all.
        for conn in list(factory.connections):
            conn.drain(STOP_QUIET)
        deadline = self.reactor.seconds() + DRAIN_GRACE
        while factory.connections and self.reactor.seconds() < deadline:
            yield _sleep(self.reactor, 0.05)
        for conn in list(factory.connections):
            conn.transport.abortConnection()
        factory.pool.close_idle()
        factory.antivirus.stop()
        self.resolver.stop()
        factory.auth_pool.stop()


def with_backlog(endpoint: str, backlog: int = 1024) -> str:
    """A TCP endpoint with a listen backlog fit for a proxy: Twisted's default of 50 overflows
    when clients arrive in bursts, and the kernel then drops their handshakes silently. An
    explicit `backlog=` in the endpoint string wins."""
    kind = endpoint.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={backlog}"
    return endpoint


def _sleep(reactor, seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _nothing() -> None:
    pass


def _at_once(send: Callable[[], None]) -> None:
    send()
