"""write_now and OutputBatch: direct sends only where Twisted's buffer is empty; order kept."""

from twisted.internet.testing import StringTransport

from safesquid_tw.proxy.directwrite import OutputBatch, write_now


def test_other_transports_are_written_the_usual_way():
    transport = StringTransport()
    write_now(transport, b"abc")
    write_now(transport, b"def")
    assert transport.value() == b"abcdef"


def test_a_batch_sends_what_it_held_as_one_send_in_order():
    transport, theirs, reactor = _plain_tcp()
    batch = OutputBatch()
    assert batch.begin(transport)
    assert not batch.begin(transport)  # nested: the outer batch ends it
    assert batch.hold(b"HTTP/1.1 200 OK\r\n\r\n")
    assert batch.hold(b"body")
    batch.end(transport)
    assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\n\r\nbody"
    assert not batch.hold(b"later")  # no batch open: the caller writes itself
    batch.end(transport)  # closing a closed batch does nothing


def test_no_batch_on_other_transports():
    batch = OutputBatch()
    assert not batch.begin(StringTransport())
    assert not batch.hold(b"x")


def test_a_batch_whose_transport_is_gone_is_dropped():
    transport, theirs, reactor = _plain_tcp()
    batch = OutputBatch()
    batch.begin(transport)
    batch.hold(b"x")
    batch.end(None)
    assert batch.pieces is None


def _plain_tcp():
    """A real tcp.Connection over a socket pair, on a reactor that only records registrations."""
    import socket

    from twisted.internet import protocol, tcp
    from twisted.internet.testing import MemoryReactor

    class Reactor(MemoryReactor):
        def __init__(self):
            super().__init__()
            self.writers = set()

        def addWriter(self, w):
            self.writers.add(w)

        def removeWriter(self, w):
            self.writers.discard(w)

        def addReader(self, r):
            pass

        def removeReader(self, r):
            pass

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reactor = Reactor()
    transport = tcp.Connection(ours, protocol.Protocol(), reactor)
    transport.connected = True
    return transport, theirs, reactor


def test_a_plain_tcp_transport_with_an_empty_buffer_sends_at_once():
    transport, theirs, reactor = _plain_tcp()
    write_now(transport, b"hello")
    assert theirs.recv(100) == b"hello"
    assert not reactor.writers  # nothing queued, no writability registration


def test_a_pull_producer_keeps_every_write_in_twisteds_buffer():
    from twisted.internet.interfaces import IPullProducer
    from zope.interface import implementer

    @implementer(IPullProducer)
    class Pull:
        def resumeProducing(self):
            pass

        def stopProducing(self):
            pass

    transport, theirs, reactor = _plain_tcp()
    transport.registerProducer(Pull(), False)
    write_now(transport, b"piece")
    assert transport in reactor.writers  # its drain asks the producer for the next piece
    transport.doWrite()
    assert theirs.recv(100) == b"piece"


def test_bytes_queued_earlier_go_first():
    transport, theirs, reactor = _plain_tcp()
    transport.write(b"first ")
    write_now(transport, b"second")
    transport.doWrite()
    assert theirs.recv(100) == b"first second"


def test_a_local_answer_leaves_only_after_its_record_is_written():
    """A client that saw its answer end can count on the record (the SIGKILL promise of
    accesslog/spoolwriter.py): on plain TCP the answer is sent directly, so it waits for the
    records of the requests it finished, written at the end of the turn in one go."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock

    from safesquid_tw.config import Limits
    from safesquid_tw.policy.codec import policy_from_document
    from safesquid_tw.proxy.resolver import Resolver
    from safesquid_tw.proxy.service import ProxyFactory

    policy = policy_from_document({
        "format": "safesquid-policy/1",
        "access": {"default_action": "allow",
                   "rules": [{"name": "no-games", "action": "deny", "domains": ["*.games.test"]}]},
    }, 3)
    transport, theirs, _ = _plain_tcp()
    theirs.setblocking(False)
    records = []
    held = []  # sends waiting for the end of the turn (the spool writer's after_records)

    def readable() -> bytes:
        try:
            return theirs.recv(65536)
        except BlockingIOError:
            return b""

    factory = ProxyFactory(reactor=MemoryReactorClock(), limits=Limits(), node_name="unit",
                           current_policy=lambda: policy, record_sink=records.append,
                           resolver=Resolver(MemoryReactorClock()))
    factory.after_records = held.append
    proto = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
    transport.protocol = proto
    transport.getPeer = lambda: IPv4Address("TCP", "10.1.2.3", 5555)
    transport.getHost = lambda: IPv4Address("TCP", "10.0.0.1", 3128)
    proto.makeConnection(transport)
    proto.dataReceived(b"GET http://www.games.test/ HTTP/1.1\r\nHost: www.games.test\r\n\r\n"
                       b"GET http://a.games.test/ HTTP/1.1\r\nHost: a.games.test\r\n\r\n")
    assert len(records) == 2
    assert readable() == b""  # both answers wait for their records
    assert len(held) == 1  # one send for the connection's whole batch
    held.pop()()  # the turn's records are written: the batch leaves
    sent = readable()
    assert sent.startswith(b"HTTP/1.1 403") and sent.count(b"HTTP/1.1 403") == 2


def test_a_batch_before_a_close_leaves_at_once_after_its_records():
    """An answer that ends the connection cannot wait for the end of the turn: its records are
    written first, then it leaves, then the close."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock

    from safesquid_tw.config import Limits
    from safesquid_tw.policy.codec import policy_from_document
    from safesquid_tw.proxy.resolver import Resolver
    from safesquid_tw.proxy.service import ProxyFactory

    policy = policy_from_document({
        "format": "safesquid-policy/1",
        "access": {"default_action": "allow",
                   "rules": [{"name": "no-games", "action": "deny", "domains": ["*.games.test"]}]},
    }, 3)
    transport, theirs, _ = _plain_tcp()
    theirs.setblocking(False)
    events = []
    records = []
    factory = ProxyFactory(reactor=MemoryReactorClock(), limits=Limits(), node_name="unit",
                           current_policy=lambda: policy, record_sink=records.append,
                           resolver=Resolver(MemoryReactorClock()))
    factory.after_records = lambda send: events.append("held")
    factory.records_due = lambda: events.append(("records written", len(records)))
    proto = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
    transport.protocol = proto
    transport.getPeer = lambda: IPv4Address("TCP", "10.1.2.3", 5555)
    transport.getHost = lambda: IPv4Address("TCP", "10.0.0.1", 3128)
    proto.makeConnection(transport)
    proto.dataReceived(b"GET http://www.games.test/ HTTP/1.1\r\nHost: www.games.test\r\n"
                       b"Connection: close\r\n\r\n")  # 403, then the close
    assert events == [("records written", 1)]
    assert theirs.recv(65536).startswith(b"HTTP/1.1 403")
    assert transport.disconnecting
