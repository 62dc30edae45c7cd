"""Accepting proxy clients without the parts of Twisted's accept loop that cost per connection.

Every CONNECT tunnel, and every browser connection, starts with an accept. Twisted's
``tcp.Port.doRead`` wraps each batch in a log-buffering context, accepts through a generator,
builds each socket object through ``socket.accept`` (which converts the family and type to enums
for every connection) and formats two strings per connection (``logstr`` and ``repstr``) that are
only read when something is logged about it or it is printed.

`install` gives a listening `tcp.Port` a `doRead` that accepts in a plain loop with the listening
socket's family and type looked up once, and builds `LeanServer` transports, which are
``tcp.Server`` in every respect (reading, writing, half-close, ``startTLS`` for inspected tunnels)
except that those two strings are made only when asked for. Accept errors other than "no more
clients" are handed to Twisted's own loop, which knows how to recover from running out of file
descriptors; the per-wakeup count (``numberAccepts``, which workers pin at one) is honoured.
"""

from __future__ import annotations

import socket
import sys
from errno import EAGAIN, EPERM, EWOULDBLOCK

from twisted.internet import address, main, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.python import failure

log = Logger()

_HALF_CLOSES: dict[type, bool] = {}  # protocol class -> implements IHalfCloseableProtocol

_NO_MORE = frozenset({EAGAIN, EWOULDBLOCK})
_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV


class LeanServer(tcp.Server):
    """A server-side TCP transport whose log prefix and repr are made only when needed."""

    def __init__(self, sock: socket.socket, protocol, client: tuple, server: tcp.Port, sessionno: int,
                 reactor, peer=None) -> None:
        # tcp.Server.__init__ without its string formatting (see logPrefix, __repr__).
        tcp.Connection.__init__(self, sock, protocol, reactor)
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self._peer = peer  # the address object already built for buildProtocol
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    @property
    def logstr(self) -> str:  # type: ignore[override]
        protocol = getattr(self, "protocol", None)
        return f"{self._getLogPrefix(protocol)},{self.sessionno},{self.hostname}"

    @property
    def repstr(self) -> str:  # type: ignore[override]
        protocol = getattr(self, "protocol", None)
        port = self.server._realPortNumber if self.server is not None else "?"
        return f"<{protocol.__class__.__name__} #{self.sessionno} on {port}>"

    def logPrefix(self) -> str:
        return self.logstr

    def getPeer(self):
        peer = self._peer
        if peer is None:
            peer = self._peer = self._addressType("TCP", *self.client)
        return peer

    def setTcpNoDelay(self, enabled: bool) -> None:
        if enabled and getattr(self.server, "nodelay_inherited", False):
            return  # accepted sockets inherit TCP_NODELAY from the listening one (Linux)
        tcp.Server.setTcpNoDelay(self, enabled)

    # The lean dispatch (proxy/fastdispatch.py) reads events of this class in its loop, as it does
    # tcp.Connection's, and calls `input_ended` when a read finds the end of the stream.
    reads_in_dispatch = True

    def doRead(self):
        """tcp.Connection.doRead, with the end of the client's input handled by `input_ended`."""
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if data:
            return self.protocol.dataReceived(data)
        return self.input_ended()

    def input_ended(self):
        """The client's end (FIN): handed to a half-closing protocol before the reactor stops
        watching the socket, so a protocol that closes the connection there (a tunnel whose other
        direction has ended) closes it without an epoll removal. Returns what the reactor should
        disconnect with, or None."""
        if self.TLS:
            return main.CONNECTION_DONE
        protocol = self.protocol
        half_closes = _HALF_CLOSES.get(type(protocol))
        if half_closes is None:
            half_closes = _HALF_CLOSES[type(protocol)] = IHalfCloseableProtocol.implementedBy(type(protocol))
        if not half_closes:
            return main.CONNECTION_DONE  # the reactor calls connectionLost, as Twisted does
        try:
            protocol.readConnectionLost()
        except BaseException:
            log.failure("handling the end of a client's input")
            self.connectionLost(failure.Failure())
            return None
        if hasattr(self, "socket"):  # still open (half-closed): nothing more to read
            self.stopReading()
        return None

    def __repr__(self) -> str:
        return self.repstr


def install(port) -> bool:
    """Accept on `port` (a listening ``tcp.Port``) with `LeanServer` transports; False (nothing
    changed) for any other kind of port."""
    if not isinstance(port, tcp.Port) or not hasattr(port, "socket"):
        return False
    port.transport = LeanServer
    port.doRead = _lean_do_read(port)
    if sys.platform.startswith("linux"):
        # Every client connection wants TCP_NODELAY (a proxy relays small writes as they come);
        # set once here, accepted sockets inherit it: one setsockopt fewer per connection.
        try:
            port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            port.nodelay_inherited = True
        except OSError:
            pass
    return True


def _lean_do_read(port):
    listener = port.socket
    accept = listener._accept  # the C call: (fd, address), no socket object yet
    family, kind, proto = int(listener.family), int(listener.type), listener.proto
    make_socket = socket.socket
    factory = port.factory
    build_addr = port._buildAddr
    reactor = port.reactor
    twisted_do_read = tcp.Port.doRead.__get__(port)

    def do_read():
        try:
            limit = port.numberAccepts
            accepted = 0
            while accepted < limit:
                try:
                    fd, addr = accept()
                except OSError as e:
                    if e.args[0] in _NO_MORE:
                        break
                    if e.args[0] == EPERM:  # netfilter refused it after all: try the next one
                        continue
                    # Out of descriptors and the like: Twisted's loop knows how to recover.
                    twisted_do_read()
                    return None
                accepted += 1
                skt = make_socket(family, kind, proto, fd)
                if len(addr) == 4:  # IPv6: keep the scope id in the host, as Twisted does
                    host = socket.getnameinfo(addr, _NUMERIC)
                    addr = (host[0], *addr[1:])
                peer = build_addr(addr)
                protocol = factory.buildProtocol(peer)
                if protocol is None:
                    skt.close()
                    continue
                s = port.sessionno
                port.sessionno = s + 1
                transport = LeanServer(skt, protocol, addr, port, s, reactor, peer)
                protocol.makeConnection(transport)
            # As Twisted: accept more per wakeup while the backlog keeps filling, fewer after.
            if accepted == limit:
                port.numberAccepts = limit + 20
            else:
                port.numberAccepts = max(1, accepted)
        except BaseException:
            log.failure("accepting a connection on {port}", port=repr(port))
        return None

    return do_read
