"""CoalescingTLS: writes made while a TLS connection delivers data leave as one record when the
delivery ends; writes at other times leave at once; held data leaves before a close."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from safesquid_tw.proxy.intercept.ca import create_ca
from safesquid_tw.proxy.intercept.fasttls import CoalescingTLS, CoalescingTLSFactory
from safesquid_tw.proxy.intercept.mint import LeafCache
from safesquid_tw.proxy.intercept.session import _ServerCreator

_CTX = None


def _server_context() -> SSL.Context:
    global _CTX
    if _CTX is None:
        ca = create_ca("fasttls test CA")
        leaves = LeafCache(None, None)
        leaves.set_ca(ca)
        _CTX = leaves._mint(ca, "localhost")[0]
    return _CTX


class Recorder(StringTransport):
    """The TCP side: every write the TLS layer makes, one entry each."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class App(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.on_data = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            self.on_data(self)


def connected_pair():
    app = App()
    factory = CoalescingTLSFactory(_ServerCreator(_server_context()), False, protocol.Factory.forProtocol(lambda: app))
    tls = factory.buildProtocol(None)
    wire = Recorder()
    tls.makeConnection(wire)
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        _to_server(client, tls)
        _to_client(wire, client)
    assert tls._handshakeDone
    tls._flushSendBIO()  # the session tickets, which otherwise leave with the first response
    _to_client(wire, client)
    _read_all(client)
    wire.writes.clear()
    return app, tls, wire, client


def _to_server(client, tls) -> None:
    try:
        data = client.bio_read(1 << 20)
    except SSL.WantReadError:
        return
    tls.dataReceived(data)


def _to_client(wire, client) -> None:
    data = wire.value()
    wire.clear()
    if data:
        client.bio_write(data)


def _read_all(client) -> bytes:
    out = b""
    while True:
        try:
            out += client.recv(1 << 16)
        except (SSL.WantReadError, SSL.ZeroReturnError):
            return out


def _records(data: bytes) -> int:
    count = 0
    while data:
        length = int.from_bytes(data[3:5], "big")
        data = data[5 + length:]
        count += 1
    return count


def test_writes_during_a_delivery_leave_as_one_record_when_it_ends():
    app, tls, wire, client = connected_pair()
    app.on_data = lambda a: (a.transport.write(b"HTTP/1.1 200 OK\r\n\r\n"), a.transport.write(b"body"),
                             a.transport.writeSequence([b"-", b"more"]))
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    _to_server(client, tls)
    assert app.received == b"GET / HTTP/1.1\r\n\r\n"
    assert len(wire.writes) == 1 and _records(wire.writes[0]) == 1
    _to_client(wire, client)
    assert _read_all(client) == b"HTTP/1.1 200 OK\r\n\r\nbody-more"


def test_writes_outside_a_delivery_leave_at_once_and_big_ones_whole():
    app, tls, wire, client = connected_pair()
    tls.write(b"now")
    assert len(wire.writes) == 1
    _to_client(wire, client)
    assert _read_all(client) == b"now"
    big = bytes(range(256)) * 1024  # 256 KiB: many records
    tls.write(big)
    _to_client(wire, client)
    assert _read_all(client) == big


def test_held_data_leaves_before_a_close_and_an_abort_drops_it():
    app, tls, wire, client = connected_pair()
    app.on_data = lambda a: (a.transport.write(b"last words"), a.transport.loseConnection())
    client.send(b"x")
    _to_server(client, tls)
    _to_client(wire, client)
    assert _read_all(client) == b"last words"  # then close_notify
    app, tls, wire, client = connected_pair()
    app.on_data = lambda a: (a.transport.write(b"never"), a.transport.abortConnection())
    client.send(b"x")
    _to_server(client, tls)
    _to_client(wire, client)
    assert _read_all(client) == b""
    assert tls._held is None


def test_several_records_in_one_read_are_all_delivered():
    app, tls, wire, client = connected_pair()
    for piece in (b"one", b"two", b"three"):
        client.send(piece)
    _to_server(client, tls)
    assert app.received == b"onetwothree"


def test_a_close_alert_from_the_client_ends_the_connection():
    app, tls, wire, client = connected_pair()
    lost = []
    app.connectionLost = lambda reason: lost.append(reason)
    client.shutdown()
    _to_server(client, tls)
    assert wire.disconnecting or lost


def test_the_factory_builds_coalescing_connections():
    assert CoalescingTLSFactory.protocol is CoalescingTLS


def _client_leg_with_records():
    """A pair whose protocol above finishes requests: its output waits for their records."""
    app, tls, wire, client = connected_pair()
    events: list[str] = []
    waiting: list = []
    app.records_due = lambda: events.append("records written")
    app.factory.after_records = lambda send: (events.append("waits for the records"), waiting.append(send))
    return app, tls, wire, client, events, waiting


def test_a_turns_output_leaves_after_the_records_it_finished_are_written():
    """As on plain TCP: a client that saw its response end can count on its access record; the
    records of every connection's turn are written once, then the held output leaves."""
    app, tls, wire, client, events, waiting = _client_leg_with_records()
    app.on_data = lambda a: (a.transport.write(b"HTTP/1.1 200 OK\r\n"), a.transport.write(b"\r\n"))
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    _to_server(client, tls)
    assert events == ["waits for the records"] and wire.writes == []
    tls.write(b"later")  # written meanwhile: joins the held output, never overtakes it
    assert wire.writes == []
    waiting.pop()()
    assert len(wire.writes) == 1 and _records(wire.writes[0]) == 1
    _to_client(wire, client)
    assert _read_all(client) == b"HTTP/1.1 200 OK\r\n\r\nlater"
    tls.write(b"after")  # nothing waits any more: at once
    assert len(wire.writes) == 2


def test_a_second_turn_before_the_records_joins_the_waiting_output():
    app, tls, wire, client, events, waiting = _client_leg_with_records()
    app.on_data = lambda a: a.transport.write(b"answer;")
    for _ in range(2):
        client.send(b"GET / HTTP/1.1\r\n\r\n")
        _to_server(client, tls)
    assert len(waiting) == 1 and wire.writes == []
    waiting.pop()()
    _to_client(wire, client)
    assert _read_all(client) == b"answer;answer;"


def test_a_close_sends_the_held_output_after_its_records_and_before_the_close():
    app, tls, wire, client, events, waiting = _client_leg_with_records()

    def answer_and_close(a):
        a.transport.write(b"bye")
        a.transport.loseConnection()

    app.on_data = answer_and_close
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    _to_server(client, tls)
    assert events == ["records written"] and not waiting
    _to_client(wire, client)
    assert _read_all(client) == b"bye"


def test_an_abort_while_output_waits_drops_it():
    app, tls, wire, client, events, waiting = _client_leg_with_records()
    app.on_data = lambda a: a.transport.write(b"never")
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    _to_server(client, tls)
    tls.abortConnection()
    waiting.pop()()
    assert not any(b"never" in w for w in wire.writes)


def test_the_origin_leg_sends_when_its_turn_ends():
    """A protocol that finishes no requests (the origin side) does not wait for records."""
    app, tls, wire, client = connected_pair()
    app.on_data = lambda a: a.transport.write(b"request")
    client.send(b"x")
    _to_server(client, tls)
    assert len(wire.writes) == 1


def test_interfaces_are_declared_as_twisteds_tls_layer_declares_them():
    from twisted.internet import tcp
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import directlyProvides, providedBy

    from safesquid_tw.proxy.intercept.fasttls import _provide_like

    class Transport(tcp.Server):
        def __init__(self) -> None:
            pass

    class Layer:
        pass

    for every in (False, True):
        for _ in range(3):  # the first computes, the others come from the cache
            transport = Transport()
            directlyProvides(transport, ISSLTransport)
            twisteds, ours = Layer(), Layer()
            if every:
                directlyProvides(twisteds, providedBy(transport))
            else:
                for interface in providedBy(transport):
                    directlyProvides(twisteds, interface)
            _provide_like(ours, transport, every)
            assert list(providedBy(ours)) == list(providedBy(twisteds))


def test_ciphertext_goes_straight_to_a_tcp_client_socket():
    """The origin leg's TLS layer is the protocol of a plain TCP client: its ciphertext is sent
    at once too, not queued for the next reactor turn."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactor

    from safesquid_tw.proxy.intercept.fasttls import _send_now

    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        theirs.settimeout(2)
        conn = tcp.Connection(ours, protocol.Protocol(), reactor=MemoryReactor())
        conn.connected = True
        _send_now(conn, b"ciphertext")
        assert theirs.recv(100) == b"ciphertext"
        assert not conn.dataBuffer and not conn._tempDataBuffer
    finally:
        ours.close()
        theirs.close()


def test_session_tickets_leave_when_the_handshake_ends():
    """Held back for the first response, they would leave the client's Finished unanswered: a
    client without TCP_NODELAY then holds its first request for the server's delayed ACK."""
    app = App()
    factory = CoalescingTLSFactory(_ServerCreator(_server_context()), False, protocol.Factory.forProtocol(lambda: app))
    tls = factory.buildProtocol(None)
    wire = Recorder()
    tls.makeConnection(wire)
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    answered_finished = None
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        was_done, sent = tls._handshakeDone, len(wire.writes)
        _to_server(client, tls)
        if tls._handshakeDone and not was_done:
            answered_finished = len(wire.writes) > sent
        _to_client(wire, client)
    assert tls._handshakeDone and client.get_protocol_version_name() == "TLSv1.3"
    assert answered_finished  # the tickets left when the client's Finished arrived
    _read_all(client)
    assert client.get_session() is not None


def test_a_tls12_handshake_sends_its_last_flight_at_once():
    app = App()
    factory = CoalescingTLSFactory(_ServerCreator(_server_context()), False, protocol.Factory.forProtocol(lambda: app))
    tls = factory.buildProtocol(None)
    wire = Recorder()
    tls.makeConnection(wire)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        _to_server(client, tls)
        _to_client(wire, client)
    assert tls._handshakeDone and client.get_protocol_version_name() == "TLSv1.2"
    client.do_handshake()  # the server's Finished arrived: nothing left to wait for


def test_a_handshake_failure_reaches_the_protocol_with_the_alert():
    reasons = []

    class Watcher(App):
        def connectionLost(self, reason):
            reasons.append(reason)

    app = Watcher()
    factory = CoalescingTLSFactory(_ServerCreator(_server_context()), False, protocol.Factory.forProtocol(lambda: app))
    tls = factory.buildProtocol(None)
    wire = Recorder()
    tls.makeConnection(wire)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: False)  # rejects the leaf: sends an alert
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error:
            pass
        _to_server(client, tls)
        _to_client(wire, client)
        if reasons:
            break
    tls.connectionLost(protocol.connectionDone)
    assert reasons and isinstance(reasons[0].value, SSL.Error)


def test_tunnels_to_one_host_share_its_creator_and_tls_factory():
    """Per inspected tunnel only the TLS connection is new: the creator and its factory are made
    once per cached context, and each tunnel still gets its own TLS layer and handshake."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactor

    from safesquid_tw.proxy.intercept.fasttls import start_server_tls
    from safesquid_tw.proxy.intercept.session import _creator_for

    ctx = _server_context()
    assert _creator_for(ctx) is _creator_for(ctx)
    pairs, layers = [], []
    try:
        for _ in range(2):
            ours, theirs = socket.socketpair()
            pairs += [ours, theirs]
            ours.setblocking(False)
            theirs.settimeout(2)
            app = App()
            conn = tcp.Connection(ours, app, reactor=MemoryReactor())
            conn.connected = True
            app.makeConnection(conn)
            start_server_tls(conn, _creator_for(ctx))
            assert isinstance(conn.protocol, CoalescingTLS) and conn.protocol.wrappedProtocol is app
            layers.append(conn.protocol)
            client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
            client.set_connect_state()
            for _ in range(10):
                try:
                    client.do_handshake()
                    break
                except SSL.WantReadError:
                    pass
                _to_server(client, conn.protocol)
                client.bio_write(theirs.recv(65536))
            _to_server(client, conn.protocol)  # the client's Finished
            assert conn.protocol._handshakeDone
        assert layers[0] is not layers[1] and layers[0].factory is layers[1].factory
        assert layers[0]._tlsConnection is not layers[1]._tlsConnection
        assert set(layers[0].factory.protocols) == set(layers)
    finally:
        for sock in pairs:
            sock.close()


def test_a_context_the_leaf_cache_dropped_is_not_kept_alive_by_its_creator():
    """A new CA or an evicted host drops a context from the leaf cache: its creator and TLS
    factory must not keep it (and its certificate and key) alive."""
    import gc
    import weakref

    from safesquid_tw.proxy.intercept.session import _creator_for

    ca = create_ca("dropped context CA")
    leaves = LeafCache(None, None)
    leaves.set_ca(ca)
    ctx = leaves._mint(ca, "dropped.example")[0]
    creator = _creator_for(ctx)
    creator.serverConnectionForTLS(None)
    gone = weakref.ref(ctx)
    del ctx, creator
    gc.collect()
    assert gone() is None


def _pair_of(layer):
    """`connected_pair` with Twisted's own TLS layer (`layer`) or ours, and the reasons the
    application's connectionLost gets."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    app = App()
    lost: list = []
    app.connectionLost = lambda reason: lost.append(reason)
    factory_class = CoalescingTLSFactory if layer is CoalescingTLS else TLSMemoryBIOFactory
    factory = factory_class(_ServerCreator(_server_context()), False, protocol.Factory.forProtocol(lambda: app))
    tls = factory.buildProtocol(None)
    wire = Recorder()
    tls.makeConnection(wire)
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        _to_server(client, tls)
        _to_client(wire, client)
    assert tls._handshakeDone
    _read_all(client)
    return app, lost, tls, client


def _end_of_tcp(layer, before_eof, fast_only=False):
    from twisted.internet.error import ConnectionDone

    app, lost, tls, client = _pair_of(layer)
    before_eof(client)
    try:
        data = client.bio_read(1 << 20)
    except SSL.WantReadError:
        data = b""
    if data:
        tls._tlsConnection.bio_write(data)  # in the BIO, not yet read, when the TCP end comes
    if layer is CoalescingTLS and fast_only:
        def no_slow_path(*args):
            raise AssertionError("pyOpenSSL's recv (an exception per call) was used")

        tls._tlsConnection.recv = no_slow_path
    tls.connectionLost(Failure(ConnectionDone()))
    assert len(lost) == 1
    return app.received, lost[0].type


def test_the_end_of_tcp_without_a_close_alert_is_reported_as_twisted_reports_it():
    """Clients often close TCP without a TLS close alert: the application hears ConnectionLost
    (as with Twisted's layer), after the plaintext still in the BIO."""
    from twisted.internet.error import ConnectionLost
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    def last_words(client):
        client.send(b"GET /last HTTP/1.1\r\n\r\n")

    for layer in (TLSMemoryBIOProtocol, CoalescingTLS):
        assert _end_of_tcp(layer, last_words, fast_only=True) == (b"GET /last HTTP/1.1\r\n\r\n", ConnectionLost)


def test_a_close_alert_then_the_end_of_tcp_is_a_clean_close():
    from twisted.internet.error import ConnectionDone
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    for layer in (TLSMemoryBIOProtocol, CoalescingTLS):
        assert _end_of_tcp(layer, lambda client: client.shutdown()) == (b"", ConnectionDone)


def test_garbage_before_the_end_of_tcp_is_an_ssl_error_as_with_twisted():
    from twisted.internet.error import ConnectionDone
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    results = []
    for layer in (TLSMemoryBIOProtocol, CoalescingTLS):
        app, lost, tls, client = _pair_of(layer)
        client.send(b"x")
        record = bytearray(client.bio_read(1 << 16))
        record[-1] ^= 0xFF  # a record that fails its authentication tag
        tls._tlsConnection.bio_write(bytes(record))
        tls.connectionLost(Failure(ConnectionDone()))
        results.append((app.received, lost[0].type))
    assert results[0] == results[1] and results[1][1] is SSL.Error
