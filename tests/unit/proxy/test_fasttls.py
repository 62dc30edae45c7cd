"""CoalescingTLS: writes made while a TLS connection delivers data leave as one record when the
delivery ends; writes at other times leave at once; held data leaves before a close."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.testing import StringTransport

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


def test_a_turns_output_leaves_after_the_records_it_finished_are_written():
    """As on plain TCP: a client that saw its response end can count on its access record."""
    from safesquid_tw.proxy.intercept.fasttls import _Turn

    events = []

    class Client:
        def records_due(self):
            events.append("records written")

    class Upstream:
        pass

    class Held:
        def __init__(self, name, wrapped):
            self.name, self.wrappedProtocol = name, wrapped

        def _flush_held(self):
            events.append(f"{self.name} sent")

    turn = _Turn()
    turn.dirty = [Held("origin leg", Upstream()), Held("client leg", Client())]
    turn.end()
    assert events == ["records written", "origin leg sent", "client leg sent"]
