"""write_now and OutputBatch: direct sends only where Twisted's buffer is empty; order kept."""

from twisted.internet.testing import StringTransport

from safesquid_tw.proxy.directwrite import OutputBatch, write_now


def test_other_transports_are_written_the_usual_way():
    transport = StringTransport()
    write_now(transport, b"abc")
    write_now(transport, b"def")
    assert transport.value() == b"abcdef"


def test_a_batch_sends_what_it_held_as_one_write_in_order():
    transport = StringTransport()
    writes = []
    transport.write = lambda data: writes.append(data)
    batch = OutputBatch()
    assert batch.begin()
    assert not batch.begin()  # nested: the outer batch ends it
    assert batch.hold(b"HTTP/1.1 200 OK\r\n\r\n")
    assert batch.hold(b"body")
    batch.end(transport)
    assert writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    assert not batch.hold(b"later")  # no batch open: the caller writes itself


def test_an_empty_batch_writes_nothing_and_a_gone_transport_is_ignored():
    batch = OutputBatch()
    batch.begin()
    batch.end(StringTransport())
    batch.begin()
    batch.hold(b"x")
    batch.end(None)
    assert batch.pieces is None
