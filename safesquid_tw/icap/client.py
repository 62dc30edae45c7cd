"""ICAP over TCP: one connection per transaction at a time, pooled per service.

`ServicePool` keeps persistent connections to one ICAP service within the service's
`Max-Connections`, asks `OPTIONS` at start and again when `Options-TTL` runs out, and runs
transactions: each gets its own connection (no head-of-line blocking across clients), a deadline,
and a body that is sent from its `HeldBody` with back-pressure (a pull producer on the socket).
"""

from __future__ import annotations

from collections import deque

import attrs
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from zope.interface import implementer

from safesquid_tw.icap import codec
from safesquid_tw.icap.holding import HeldBody

log = Logger()

DEFAULT_MAX_CONNECTIONS = 32  # when the service does not say (and our own ceiling)
MAX_IDLE = 16
PIECE = 65536


class IcapUnavailable(Exception):
    """The service could not be reached, timed out, or broke the protocol."""


@attrs.define
class Transaction:
    """One ICAP request: its first bytes, and the body bytes still to send after them."""

    first: bytes
    body: HeldBody | None = None
    body_offset: int = 0  # where the rest of the body starts
    send_rest_now: bool = False  # no preview: the rest follows at once
    expects_continue: bool = False  # a preview was sent without ieof
    result: defer.Deferred = attrs.field(factory=defer.Deferred)


@implementer(IPullProducer)
class _BodySender:
    def __init__(self, conn: "IcapConnection", body: HeldBody, offset: int) -> None:
        self.conn = conn
        self.body = body
        self.offset = offset
        self.done = False

    def resumeProducing(self) -> None:
        if self.done:
            return
        data = self.body.read(self.offset, PIECE)
        transport = self.conn.transport
        if data:
            self.offset += len(data)
            transport.write(codec.encode_chunk(data))
            return
        self.done = True
        transport.write(codec.LAST_CHUNK)
        transport.unregisterProducer()
        self.conn.body_sent()

    def stopProducing(self) -> None:
        self.done = True


class IcapConnection(protocol.Protocol):
    def __init__(self, pool: "ServicePool") -> None:
        self.pool = pool
        self.parser = codec.ResponseParser()
        self.txn: Transaction | None = None
        self.sender: _BodySender | None = None
        self.sending = False
        self.reusable = True
        self.closed = False
        self.served = 0  # transactions answered on this connection
        self.got_bytes = False  # for the current transaction

    def run(self, txn: Transaction) -> None:
        self.txn = txn
        self.got_bytes = False
        self.sending = txn.send_rest_now
        self.transport.write(txn.first)
        if txn.send_rest_now and txn.body is not None:
            self._send_rest()

    def _send_rest(self) -> None:
        txn = self.txn
        self.sending = True
        self.sender = _BodySender(self, txn.body, txn.body_offset)
        self.transport.registerProducer(self.sender, False)

    def body_sent(self) -> None:
        self.sending = False
        self.sender = None

    def dataReceived(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            responses = self.parser.feed(data)
        except codec.IcapProtocolError as e:
            self._fail(IcapUnavailable(f"protocol error: {e}"))
            return
        for response in responses:
            txn = self.txn
            if txn is None:
                self._fail(IcapUnavailable(f"an unrequested ICAP response ({response.status})"))
                return
            if response.status == 100:
                if txn.expects_continue and not self.sending:
                    txn.expects_continue = False
                    self._send_rest()
                continue
            self._answered(response)

    def _answered(self, response: codec.IcapResponse) -> None:
        txn, self.txn = self.txn, None
        self.served += 1
        connection = (response.get("Connection") or "").lower()
        if self.sending or "close" in connection or not self.parser.idle:
            # The server answered while the body was still going out: the rest of the message
            # is in flight, so this connection cannot carry another one. (A final answer to a
            # preview, before any 100 Continue, leaves the connection clean: the preview ended
            # with its own last chunk and the rest is simply never sent, RFC 3507 4.5.)
            self.reusable = False
            if self.sender is not None:
                self.sender.stopProducing()
                self.transport.unregisterProducer()
                self.sender = None
        self.pool._finished(self, self.reusable)
        txn.result.callback(response)

    def _fail(self, error: Exception) -> None:
        txn, self.txn = self.txn, None
        self.reusable = False
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()
        if txn is not None and not txn.result.called:
            self.pool._finished(self, False)
            txn.result.errback(error)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.closed = True
        self.reusable = False
        self.pool._lost(self)
        if self.txn is not None:
            txn, self.txn = self.txn, None
            self.pool._finished(self, False)
            if not txn.result.called:
                txn.result.errback(IcapUnavailable(f"connection closed: {reason.getErrorMessage()}"))

    def timed_out(self, seconds: float) -> None:
        if self.txn is not None:
            self._fail(IcapUnavailable(f"no answer within {seconds:g} s"))


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, pool: "ServicePool") -> None:
        self.pool = pool

    def buildProtocol(self, addr):
        return IcapConnection(self.pool)


class ServicePool:
    """Connections and OPTIONS of one ICAP service."""

    def __init__(self, reactor, url: codec.ServiceUrl) -> None:
        self.reactor = reactor
        self.url = url
        self.options: codec.ServiceOptions | None = None
        self.options_at = 0.0
        self._idle: list[IcapConnection] = []
        self._busy: set[IcapConnection] = set()
        self._connecting = 0
        self._waiting: deque[defer.Deferred] = deque()
        self._options_d: defer.Deferred | None = None

    # -- limits ---------------------------------------------------------------------------------
    @property
    def max_connections(self) -> int:
        advertised = self.options.max_connections if self.options is not None else None
        if not advertised:
            return DEFAULT_MAX_CONNECTIONS
        return max(1, min(advertised, DEFAULT_MAX_CONNECTIONS))

    def options_stale(self) -> bool:
        if self.options is None:
            return True
        ttl = self.options.ttl
        return ttl is not None and self.reactor.seconds() - self.options_at >= ttl

    # -- connections ----------------------------------------------------------------------------
    def _acquire(self, timeout: float) -> defer.Deferred:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                self._busy.add(conn)
                return defer.succeed(conn)
        if len(self._busy) + self._connecting < self.max_connections:
            return self._connect(timeout)
        d: defer.Deferred = defer.Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        return d

    def _connect(self, timeout: float) -> defer.Deferred:
        self._connecting += 1
        endpoint = endpoints.HostnameEndpoint(self.reactor, self.url.host.encode("idna"), self.url.port,
                                              timeout=max(1, int(timeout)))
        d = endpoint.connect(_Factory(self))

        def connected(conn):
            self._connecting -= 1
            self._busy.add(conn)
            return conn

        def failed(reason):
            self._connecting -= 1
            self._wake()
            raise IcapUnavailable(f"cannot connect to {self.url.text}: {reason.getErrorMessage()}")

        return d.addCallbacks(connected, failed)

    def _finished(self, conn: IcapConnection, reusable: bool) -> None:
        self._busy.discard(conn)
        if reusable and not conn.closed:
            if self._waiting:
                self._busy.add(conn)
                self._waiting.popleft().callback(conn)
                return
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        if not conn.closed:
            conn.closed = True
            conn.transport.loseConnection()
        self._wake()

    def _lost(self, conn: IcapConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
        if conn in self._busy and conn.txn is None:
            self._busy.discard(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiting and len(self._busy) + self._connecting < self.max_connections:
            waiter = self._waiting.popleft()
            self._connect(30).chainDeferred(waiter)

    def close(self) -> None:
        for conn in self._idle + list(self._busy):
            if not conn.closed:
                conn.closed = True
                conn.transport.abortConnection()
        self._idle = []
        while self._waiting:
            self._waiting.popleft().errback(IcapUnavailable("the service was removed"))

    # -- transactions ---------------------------------------------------------------------------
    @defer.inlineCallbacks
    def transact(self, txn: Transaction, timeout: float, retried: bool = False):
        """Run one transaction; the final (non-100) response, or IcapUnavailable."""
        deadline = self.reactor.seconds() + timeout
        acquired = self._acquire(timeout)
        timer = self.reactor.callLater(timeout, acquired.cancel)
        try:
            conn = yield acquired
        except defer.CancelledError:
            raise IcapUnavailable(f"no connection to {self.url.text} within {timeout:g} s") from None
        finally:
            if timer.active():
                timer.cancel()
        left = max(0.001, deadline - self.reactor.seconds())
        timer = self.reactor.callLater(left, conn.timed_out, timeout)
        try:
            conn.run(txn)
            response = yield txn.result
        except IcapUnavailable:
            if conn.served == 0 or conn.got_bytes or retried:
                raise
            # A kept-alive connection the server had closed meanwhile (its keep-alive timeout,
            # MaxKeepAliveRequests): not a failure of the service; once more on a fresh one.
            fresh = attrs.evolve(txn, result=defer.Deferred())
            response = yield self.transact(fresh, max(0.001, deadline - self.reactor.seconds()), retried=True)
        finally:
            if timer.active():
                timer.cancel()
        return response

    def refresh_options(self, timeout: float) -> defer.Deferred:
        """Ask OPTIONS (one request at a time however many callers ask); the parsed options."""
        if self._options_d is not None:
            return self._wait_options()
        self._options_d = defer.Deferred()
        return self._fetch_options(timeout)

    @defer.inlineCallbacks
    def _fetch_options(self, timeout: float):
        try:
            txn = Transaction(codec.options_request(self.url))
            response = yield self.transact(txn, timeout)
            try:
                options = codec.parse_options(response)
            except codec.IcapProtocolError as e:
                raise IcapUnavailable(str(e)) from None
            self.options = options
            self.options_at = self.reactor.seconds()
        except Exception as e:
            waiters, self._options_d = self._options_d, None
            waiters.callback(e)
            raise
        waiters, self._options_d = self._options_d, None
        waiters.callback(options)
        return options

    @defer.inlineCallbacks
    def _wait_options(self):
        d: defer.Deferred = defer.Deferred()
        self._options_d.addCallback(lambda r: (d.callback(r), r)[1])
        result = yield d
        if isinstance(result, Exception):
            raise IcapUnavailable(str(result))
        return result

    def stats(self) -> dict:
        return {"idle": len(self._idle), "busy": len(self._busy), "waiting": len(self._waiting),
                "max_connections": self.max_connections}


__all__ = ["IcapConnection", "IcapUnavailable", "ServicePool", "Transaction"]
