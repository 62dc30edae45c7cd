"""The TLS layer alone, in one process: time per request leg inside an inspected tunnel.

One leg is what the node's TLS layer does per request on one side of an inspected tunnel: read a
record holding a request, hand it to the protocol above, and encrypt the response head and body
that protocol writes (two writes). Compared in the same run: Twisted's default TLS transport
(`BufferingTLSTransport`, which flushes on the next reactor turn: driven here by a `task.Clock`),
its unbuffered base (`TLSMemoryBIOProtocol`) and the node's `CoalescingTLS`. Nothing is sent: the
TCP side is a memory transport, so the figures are the TLS layer's own cost, without system calls.

    python bench/tls_layer_bench.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OpenSSL import SSL  # noqa: E402
from twisted.internet import protocol, task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol  # noqa: E402

from safesquid_tw.proxy.intercept.ca import create_ca  # noqa: E402
from safesquid_tw.proxy.intercept.fasttls import CoalescingTLS  # noqa: E402
from safesquid_tw.proxy.intercept.mint import LeafCache  # noqa: E402
from safesquid_tw.proxy.intercept.session import _ServerCreator  # noqa: E402

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nVia: 1.1 node\r\nDate: Thu, 03 Dec 2026 13:00:00 GMT\r\n\r\n"
BODY = b"x" * 100
REQUEST = b"GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n"


class _Answer(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(HEAD)
        self.transport.write(BODY)


def leg_microseconds(cls, ctx: SSL.Context, requests: int) -> float:
    clock = task.Clock()
    factory = TLSMemoryBIOFactory(_ServerCreator(ctx), False, protocol.Factory.forProtocol(_Answer), clock=clock)
    factory.protocol = cls
    tls = factory.buildProtocol(None)
    wire = StringTransport()
    tls.makeConnection(wire)
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            tls.dataReceived(client.bio_read(65536))
        except SSL.WantReadError:
            pass
        clock.advance(0)
        if wire.value():
            client.bio_write(wire.value())
            wire.clear()

    def one() -> float:
        client.send(REQUEST)
        record = client.bio_read(65536)
        start = time.perf_counter()
        tls.dataReceived(record)
        clock.advance(0)
        spent = time.perf_counter() - start
        client.bio_write(wire.value())
        wire.clear()
        got = b""
        while len(got) < len(HEAD) + len(BODY):
            got += client.recv(65536)
        return spent

    for _ in range(500):
        one()
    rounds = 5
    per_round = max(requests // rounds, 1)
    return min(sum(one() for _ in range(per_round)) / per_round for _ in range(rounds)) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args(argv)
    ca = create_ca("tls layer bench CA")
    leaves = LeafCache(None, None)
    leaves.set_ca(ca)
    ctx = leaves._mint(ca, "localhost")[0]
    results = {cls.__name__: leg_microseconds(cls, ctx, args.requests)
               for cls in (BufferingTLSTransport, TLSMemoryBIOProtocol, CoalescingTLS)}
    reference = results["BufferingTLSTransport"]
    print("µs per request leg (read a request record, write head + body), best of 5 rounds")
    for name, value in results.items():
        print(f"  {name:24} {value:7.2f}  ({value / reference:.2f} of Twisted's default)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
