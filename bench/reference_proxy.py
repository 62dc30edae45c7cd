"""The reference forward proxy: `twisted.web.proxy` as it comes, in one process.

    python bench/reference_proxy.py --port 3128 [--interface 127.0.0.1] [--keep-alive] [--access-log FILE]

`proxy.Proxy` opens a new upstream connection for every request and speaks HTTP/1.0 to the
origin. It also passes the origin's hop-by-hop `Connection: close` on to the client, so a client
that honours it (wrk does) reconnects for every request as well. `--keep-alive` drops that header
from responses, which lets clients keep their connections: a stronger reference than the stock
one. By default it writes no access log, so it is measured at its fastest. With `--port 0` it picks a free port. Once listening it prints one line,
`listening HOST:PORT`, and flushes it, so a benchmark can start it and read where it is.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.web import http, proxy


class QuietHTTPFactory(http.HTTPFactory):
    """An HTTPFactory that writes no access log line unless given a log path."""

    def log(self, request: http.Request) -> None:
        if self.logPath is not None:
            super().log(request)


class KeepAliveProxyClient(proxy.ProxyClient):
    """Leaves out the origin's Connection header: it concerns the upstream hop only."""

    def handleHeader(self, key: bytes, value: bytes) -> None:
        if key.lower() != b"connection":
            super().handleHeader(key, value)


class KeepAliveProxyClientFactory(proxy.ProxyClientFactory):
    protocol = KeepAliveProxyClient


class KeepAliveProxyRequest(proxy.ProxyRequest):
    protocols = {b"http": KeepAliveProxyClientFactory}


class KeepAliveProxy(proxy.Proxy):
    requestFactory = KeepAliveProxyRequest


def build_factory(access_log: str | None = None, keep_alive: bool = False) -> http.HTTPFactory:
    factory = QuietHTTPFactory(logPath=access_log)
    factory.protocol = KeepAliveProxy if keep_alive else proxy.Proxy
    return factory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="twisted.web.proxy as a benchmark reference")
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--access-log", help="write a combined-format access log here")
    parser.add_argument("--keep-alive", action="store_true",
                        help="do not pass the origin's Connection: close on to the client")
    args = parser.parse_args(argv)

    # A backlog larger than Twisted's default of 50, as a benchmark opens many connections at once.
    port = reactor.listenTCP(args.port, build_factory(args.access_log, args.keep_alive), backlog=1024, interface=args.interface)
    address = port.getHost()
    print(f"listening {address.host}:{address.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
