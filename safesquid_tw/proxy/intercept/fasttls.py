"""TLS layers for inspected traffic that write one record per turn and send it at once.

Twisted's default TLS transport (`BufferingTLSTransport`) holds every write for a `callLater(0)`;
on the next reactor turn it encrypts what it holds and queues the ciphertext in the TCP
transport's buffer, which registers the socket for writability (epoll_ctl), sends on the turn
after that and unregisters it again. Per request inside an inspected tunnel that is twice (the
request toward the origin, the response toward the client): a timer, two extra loop iterations
and four epoll_ctl calls around two sends.

`CoalescingTLS` instead:

- holds what is written while one of these TLS connections is delivering received data (a
  "turn": an origin read that writes a response head and its body to the client, a client read
  that writes a request head to the origin) and encrypts it as one TLS record when the turn
  ends, on whichever connection it was written to;
- encrypts at once what is written outside a turn (a thread's result, a timer);
- sends the ciphertext straight to the socket when nothing is queued in front of it (as
  `directwrite.write_now` does for plain TCP), handing what the kernel did not take to Twisted's
  buffer, so flow control, producers and closes stay Twisted's.

What a turn finished on the client side (a response) waits for the records of the requests it
finishes: they are written once at the end of the reactor turn with every other connection's
(`SpoolWriter.after_records`, as plain TCP's output does), then it leaves; what is written
meanwhile joins it. Held data always leaves before a close (`loseConnection`, or the end of a
producer that asked for one), its records written first; an abort drops it, as it drops
everything else.

The handshake, and once it is done every record read and written, calls OpenSSL through
pyOpenSSL's own cffi binding with buffers allocated once: pyOpenSSL's `recv`, `send` and `bio_read` allocate
a buffer per call and signal "nothing more" by raising, which cost more than the cipher itself
for the small records of a web request. Anything unusual (an error, a close alert, a write
OpenSSL cannot take now) goes back to Twisted's code path, which raises and handles it as always.
"""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL.SSL import WantReadError
from twisted.internet import tcp
from twisted.internet._newtls import _BypassTLS
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

log = Logger()

_BIO_CHUNK = 2**16  # under glibc's mmap threshold: a plain malloc per read
_RECORD = 2**14  # the most plaintext one TLS record carries

try:  # pyOpenSSL's binding and the Connection attributes the fast paths use
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    _FAST = all(hasattr(_probe, name) for name in ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error"))
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    # Shared buffers: only the reactor thread runs these connections, and every read is copied out.
    _PLAIN_BUF = _ffi.new("char[]", _BIO_CHUNK)
    _CIPHER_BUF = _ffi.new("char[]", _BIO_CHUNK)
    # OpenSSL 3 and later say "unexpected EOF" with this reason (earlier: SSL_ERROR_SYSCALL).
    _EOF_REASON = (_lib.SSL_R_UNEXPECTED_EOF_WHILE_READING
                   if getattr(_lib, "Cryptography_HAS_UNEXPECTED_EOF_WHILE_READING", 0) else None)
    del _probe
except Exception:  # a pyOpenSSL without them: Twisted's own paths only
    _FAST = False


class _Turn:
    """Which TLS connections hold writes until the outermost delivery of received data ends."""

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[CoalescingTLS] = []

    def end(self) -> None:
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for tls in dirty:
                try:
                    tls._turn_ended()
                except Exception:  # one connection's failure must not strand the others' output
                    tls._held = None
                    tls._waiting = False
                    log.failure("sending TLS output")


_TURN = _Turn()


def _send_now(bypass, data: bytes) -> None:
    """Ciphertext to the socket at once when nothing is queued in front of it; else Twisted's way."""
    # The server leg writes through `_BypassTLS` (wrapping the TCP connection that started TLS);
    # the origin leg's TLS layer is the protocol of a plain TCP client, its transport that client.
    conn = bypass if isinstance(bypass, tcp.Connection) else getattr(bypass, "_connection", None)
    if (
        isinstance(conn, tcp.Connection)
        and conn.connected
        and not conn.disconnecting
        and not conn._writeDisconnected
        and not getattr(conn, "_aborting", False)
        # A pull producer is asked for more only when Twisted's buffer drains: keep it in the loop.
        and (conn.producer is None or conn.streamingProducer)
        and not conn._tempDataBuffer
        and len(conn.dataBuffer) == conn.offset
    ):
        try:
            sent = conn.socket.send(data)
        except (BlockingIOError, InterruptedError, OSError):
            sent = 0  # a real error meets the queued write below and is reported Twisted's way
        if sent == len(data):
            return
        data = data[sent:]
    bypass.write(data)


_NOTHING = object()
_PROVIDES: dict[tuple, object] = {}
_PROVIDES_MAX = 64  # a handful of transport kinds in practice; never grows without bound


def _provide_like(obj, transport, every: bool) -> None:
    """What `TLSMemoryBIOProtocol.makeConnection` (`every=False`: one `directlyProvides` per
    interface of the transport, each replacing the last) or `ProtocolWrapper.makeConnection`
    (`every=True`: all of them) declare on `obj`, taken from a cache after the first time.

    Each `directlyProvides` normalises its arguments, and the declaration it builds is cached by
    zope only while something holds it: with no TLS connection alive it is computed again,
    resolution order included. Per inspected tunnel that was about a tenth of its CPU."""
    spec = providedBy(transport)
    key = (type(obj), spec, every)
    provides = _PROVIDES.get(key)
    if provides is None:
        if every:
            directlyProvides(obj, spec)
        else:
            for interface in spec:
                directlyProvides(obj, interface)
        provides = obj.__dict__.get("__provides__", _NOTHING)
        if len(_PROVIDES) < _PROVIDES_MAX:
            _PROVIDES[key] = provides  # holds `spec` too, so the same transports find it again
    elif provides is not _NOTHING:
        obj.__provides__ = provides


def _after_records_of(wrapped):
    """The client side's `after_records` (proxy/service.py): a protocol that finishes requests
    (it has `records_due`) sends their output once the records are written."""
    if getattr(wrapped, "records_due", None) is None:
        return None
    return getattr(getattr(wrapped, "factory", None), "after_records", None)


class CoalescingTLS(TLSMemoryBIOProtocol):
    _held: list[bytes] | None = None
    # Held output waits for the records of the requests it finishes, written once at the end of
    # the reactor turn with every other connection's (as plain TCP's output does, proxy/frontdoor.py
    # `send_output`): what is written meanwhile joins it, so nothing overtakes it.
    _waiting = False

    def makeConnection(self, transport) -> None:
        """`TLSMemoryBIOProtocol.makeConnection` with its interface declarations cached."""
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        _provide_like(self, transport, every=False)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            # ProtocolWrapper.makeConnection, as Twisted's calls it here
            _provide_like(self, transport, every=True)
            Protocol.makeConnection(self, transport)
            self.factory.registerProtocol(self)
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()

    def dataReceived(self, data: bytes) -> None:
        turn = _TURN
        turn.depth += 1
        try:
            if not _FAST or self._appSendBuffer or self._lostTLSConnection:
                super().dataReceived(data)
            elif self._handshakeDone:
                self._read_records(data)
            elif not self._aborted:
                self._handshake(data)
        finally:
            turn.depth -= 1
            if not turn.depth and turn.dirty:
                turn.end()

    def _handshake(self, data: bytes) -> None:
        """`TLSMemoryBIOProtocol.dataReceived` during the handshake, without a raise per step.
        What the handshake writes leaves at once, a TLS 1.3 server's session tickets included:
        held back for the first response, they would leave the client's Finished unanswered, and
        a client without TCP_NODELAY then holds its first request for our delayed ACK (Nagle)."""
        conn = self._tlsConnection
        if _lib.BIO_write(conn._into_ssl, data, len(data)) != len(data):
            conn.bio_write(data)
        self._checkHandshakeStatus()
        if self._handshakeDone:
            self._drain()

    def _checkHandshakeStatus(self) -> None:
        """Twisted's, with OpenSSL called directly: "not yet" is an answer, not an exception."""
        if not _FAST:
            super()._checkHandshakeStatus()
            return
        if self._aborted:
            return
        conn = self._tlsConnection
        ssl = conn._ssl
        done = _lib.SSL_do_handshake(ssl)
        if done <= 0:
            if _lib.SSL_get_error(ssl, done) == _WANT_READ:
                self._flushSendBIO()
                return
            try:
                conn._raise_ssl_error(ssl, done)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            return
        self._handshakeDone = True
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _read_records(self, data: bytes) -> None:
        """`TLSMemoryBIOProtocol.dataReceived` after the handshake, without a raise per call."""
        conn = self._tlsConnection
        if _lib.BIO_write(conn._into_ssl, data, len(data)) != len(data):
            # A memory BIO takes all or (out of memory) nothing: pyOpenSSL retries and raises.
            conn.bio_write(data)
        self._drain()

    def _drain(self) -> None:
        """Deliver the plaintext of every whole record received; then send what reading made
        OpenSSL say (alerts, key updates, session tickets)."""
        conn = self._tlsConnection
        ssl = conn._ssl
        while not self._lostTLSConnection:
            n = _lib.SSL_read(ssl, _PLAIN_BUF, _BIO_CHUNK)
            if n > 0:
                plain = _ffi.buffer(_PLAIN_BUF, n)[:]
                if not self._aborted:
                    self.wrappedProtocol.dataReceived(plain)
                continue
            if _lib.SSL_get_error(ssl, n) == _WANT_READ:
                break
            try:
                conn._raise_ssl_error(ssl, n)
            except SSL.ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            break
        self._flushSendBIO()

    def write(self, data: bytes) -> None:
        if self.disconnecting and self._producer is None:
            return  # as Twisted's: writes after loseConnection are dropped
        if not data:
            return
        if _TURN.depth or self._waiting:
            held = self._held
            if held is None:
                self._held = [data]
                if _TURN.depth:
                    _TURN.dirty.append(self)
            else:
                held.append(data)
            return
        self._write(data)

    def writeSequence(self, iovec) -> None:
        self.write(b"".join(iovec))

    def _turn_ended(self) -> None:
        if self._waiting:
            return  # a send after the records is pending already: it takes this turn's output too
        after_records = _after_records_of(self.wrappedProtocol) if self._held else None
        if after_records is None:
            self._flush_held()
            return
        self._waiting = True
        after_records(self._records_written)

    def _records_written(self) -> None:
        if self._waiting:
            self._waiting = False
            self._flush_held()

    def _flush_now(self) -> None:
        """Before a close: what is held leaves now, the records it finishes written first."""
        if self._held:
            records_due = getattr(self.wrappedProtocol, "records_due", None)
            if records_due is not None:
                records_due()
        self._waiting = False
        self._flush_held()

    def _flush_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self._write(held[0] if len(held) == 1 else b"".join(held))

    def _write(self, data: bytes) -> None:
        if not _FAST or not self._handshakeDone or self._appSendBuffer or self._lostTLSConnection:
            super()._write(data)
            return
        ssl = self._tlsConnection._ssl
        done, total = 0, len(data)
        while done < total:
            piece = data[done:done + _RECORD] if done or total > _RECORD else data
            n = _lib.SSL_write(ssl, piece, len(piece))
            if n <= 0:
                # OpenSSL cannot take it now (or failed): Twisted's path buffers or reports it.
                self._flushSendBIO()
                super()._write(data[done:])
                return
            done += n
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        if _FAST:
            bio = self._tlsConnection._from_ssl
            n = _lib.BIO_read(bio, _CIPHER_BUF, _BIO_CHUNK)
            if n <= 0:
                return  # nothing to send
            data = _ffi.buffer(_CIPHER_BUF, n)[:]
            while n == _BIO_CHUNK:
                n = _lib.BIO_read(bio, _CIPHER_BUF, _BIO_CHUNK)
                if n > 0:
                    data += _ffi.buffer(_CIPHER_BUF, n)[:]
            _send_now(self.transport, data)
            return
        while True:
            try:
                data = self._tlsConnection.bio_read(_BIO_CHUNK)
            except WantReadError:
                return  # nothing to send
            _send_now(self.transport, data)
            if len(data) < _BIO_CHUNK:
                return

    def loseConnection(self) -> None:
        self._flush_now()
        super().loseConnection()

    def unregisterProducer(self) -> None:
        if self.disconnecting:
            self._flush_now()  # ending the producer starts the TLS shutdown
        super().unregisterProducer()

    def abortConnection(self) -> None:
        self._held = None
        self._waiting = False
        super().abortConnection()

    def connectionLost(self, reason) -> None:
        self._held = None
        self._waiting = False
        if _FAST and not self._lostTLSConnection and self._tlsConnection is not None:
            self._end_of_input()
        super().connectionLost(reason)

    def _end_of_input(self) -> None:
        """What Twisted's `connectionLost` does when TCP ends before a TLS close alert (most
        clients close that way), without its exception and traceback-capturing `Failure`: tell
        OpenSSL the input has ended, deliver the plaintext still buffered, and report an end
        without a close alert as `ConnectionLost`, as Twisted does. Anything else OpenSSL says
        (a bad record, a close alert) is left where it is, for Twisted's path to report."""
        conn = self._tlsConnection
        ssl = conn._ssl
        _lib.BIO_set_mem_eof_return(conn._into_ssl, 0)
        while True:
            n = _lib.SSL_read(ssl, _PLAIN_BUF, _BIO_CHUNK)
            if n <= 0:
                break
            plain = _ffi.buffer(_PLAIN_BUF, n)[:]
            if not self._aborted:
                self.wrappedProtocol.dataReceived(plain)
            if self._lostTLSConnection or self._tlsConnection is None:
                return
        error = _lib.SSL_get_error(ssl, n)
        queued = _lib.ERR_peek_error()
        if error == _lib.SSL_ERROR_SYSCALL and not queued:
            pass
        elif (error == _lib.SSL_ERROR_SSL and _EOF_REASON is not None
              and _lib.ERR_GET_REASON(queued) == _EOF_REASON):
            _lib.ERR_clear_error()
        else:
            return
        if self._reason is None:
            self._reason = Failure(CONNECTION_LOST)
        self._lostTLSConnection = True
        self._flushSendBIO()
        self.transport.loseConnection()


class CoalescingTLSFactory(TLSMemoryBIOFactory):
    protocol = CoalescingTLS


def start_server_tls(transport, creator) -> None:
    """`transport.startTLS(creator)` for the server side of a plain TCP connection, with a
    `CoalescingTLS` layer (any other transport gets its own startTLS)."""
    if not isinstance(transport, tcp.Connection) or transport.TLS:
        transport.startTLS(creator)
        return
    producer, streaming = transport.producer, transport.streamingProducer
    if producer is not None:
        transport.unregisterProducer()
    # A creator that keeps its factory (session.py: one per cached context) saves making one
    # per tunnel; the factory only counts its live connections.
    factory = getattr(creator, "tls_factory", None)
    if factory is None:
        factory = CoalescingTLSFactory(creator, False, None)
        if hasattr(creator, "tls_factory"):
            creator.tls_factory = factory
    tls = CoalescingTLS(factory, transport.protocol, False)
    transport.protocol = tls
    transport.getHandle = tls.getHandle
    transport.getPeerCertificate = tls.getPeerCertificate
    directlyProvides(transport, ISSLTransport)
    transport.TLS = True
    tls.makeConnection(_BypassTLS(FileDescriptor, transport))
    if producer is not None:
        transport.registerProducer(producer, streaming)


def connect_tls(reactor, host: str, port: int, factory, creator, *, timeout: float) -> None:
    """`reactor.connectSSL` with a `CoalescingTLS` layer."""
    reactor.connectTCP(host, port, CoalescingTLSFactory(creator, True, factory), timeout=timeout)


__all__ = ["CoalescingTLS", "connect_tls", "start_server_tls"]
