"""Request-head and chunked-body parsing: safesquid_tw.proxy.http1 against other parsers.

Run by hand from the repository root (it is not a test)::

    PYTHONPATH=. .venv/bin/python bench/parser_bench.py [--quick]

For each sample it prints microseconds per message for our parser, httptools (llhttp, C),
h11 (pure Python) and twisted.web's HTTPChannel (pure Python, what twisted.web.server uses),
and each one's ratio to ours (above 1.0 means slower than ours).

What is timed, per message, is what a proxy front door needs before it can decide on a request:
the head found and split into method, target, version and header pairs, the body framing
settled, and the body bytes delivered. Libraries that keep state per connection (an h11
Connection, a twisted HTTPChannel) are timed with a fresh one per message; the
cost of creating that empty object alone is printed and subtracted in the "net" column, the
fairer figure for a keep-alive connection. The httptools parser is reused across messages, as
it would be on a keep-alive connection. twisted.web's figure for a chunked request includes the
temporary file it opens for a body of unknown length. Timings are the best of many short
interleaved rounds, so a busy machine disturbs every contender alike.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable

import h11
import httptools
from twisted.internet.testing import StringTransport
from twisted.web import http

from safesquid_tw.proxy.headers import strip_hop_by_hop
from safesquid_tw.proxy.http1 import (
    ChunkedDecoder, encode_chunk, LAST_CHUNK, parse_request_head, request_framing, split_head,
)
from safesquid_tw.proxy.target import parse_target

BROWSER_GET = (
    b"GET http://www.example.com/articles/2024/some-long-article-title.html?ref=home&utm=x "
    b"HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
    b"image/webp,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.7,de;q=0.3\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: http://www.example.com/\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=9f1c2a7e4b8d4c0fa3e1; theme=dark; consent=yes; _ga=GA1.2.1234.5678\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\n"
    b"Sec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Priority: u=0, i\r\n"
    b"\r\n"
)
FORM = b"user=alice&comment=hello+world&submit=Send"
POST_LENGTH = (
    b"POST http://forms.example.org/comment HTTP/1.1\r\n"
    b"Host: forms.example.org\r\n"
    b"User-Agent: curl/8.9.1\r\n"
    b"Accept: */*\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % len(FORM)
) + FORM
POST_CHUNKED = (
    b"POST http://upload.example.org/api/v1/items HTTP/1.1\r\n"
    b"Host: upload.example.org\r\n"
    b"User-Agent: python-requests/2.32.3\r\n"
    b"Accept: application/json\r\n"
    b"Content-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
) + encode_chunk(b'{"name": "widget", ') + encode_chunk(b'"count": 3}') + LAST_CHUNK

BODY_CHUNK = bytes(range(256)) * 16  # 4 KiB
BIG_CHUNKED_BODY = encode_chunk(BODY_CHUNK) * 16 + LAST_CHUNK  # 64 KiB of payload
BIG_CHUNKED = POST_CHUNKED.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + BIG_CHUNKED_BODY
SEGMENT = 1460  # bytes per read, as a TCP segment would deliver them


def segments(data: bytes) -> list[bytes]:
    return [data[i:i + SEGMENT] for i in range(0, len(data), SEGMENT)]


# ---------------------------------------------------------------------------- ours


def ours(data: bytes) -> None:
    end = split_head(data, 8192, 65536)
    head = parse_request_head(data[:end])
    framing = request_framing(head)
    if framing.kind == "length":
        data[end:end + framing.length]
    elif framing.kind == "chunked":
        decoder = ChunkedDecoder()
        decoder.feed(data[end:])
        assert decoder.done


def ours_with_target(data: bytes) -> None:
    end = split_head(data, 8192, 65536)
    head = parse_request_head(data[:end])
    framing = request_framing(head)
    parse_target(head.method, head.target)
    strip_hop_by_hop(head.headers)
    if framing.kind == "length":
        data[end:end + framing.length]
    elif framing.kind == "chunked":
        decoder = ChunkedDecoder()
        decoder.feed(data[end:])


def ours_chunked_body(pieces: list[bytes]) -> None:
    decoder = ChunkedDecoder()
    for piece in pieces:
        decoder.feed(piece)
    assert decoder.done


# ---------------------------------------------------------------------------- httptools


class _HttptoolsCollector:
    """Collects what the proxy needs, as a real front door on httptools would."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.url = b""
        self.complete = False

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


_HTTPTOOLS_PROTO = _HttptoolsCollector()
_HTTPTOOLS_PARSER = httptools.HttpRequestParser(_HTTPTOOLS_PROTO)


def httptools_reused(data: bytes) -> None:
    _HTTPTOOLS_PARSER.feed_data(data)
    _HTTPTOOLS_PARSER.get_method()
    assert _HTTPTOOLS_PROTO.complete


def httptools_chunked_body(pieces: list[bytes]) -> None:
    parser = httptools.HttpRequestParser(_HttptoolsCollector())
    for piece in pieces:
        parser.feed_data(piece)


# ---------------------------------------------------------------------------- h11


def h11_fresh(data: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or type(event) is h11.EndOfMessage:
            break


def h11_chunked_body(pieces: list[bytes]) -> None:
    conn = h11.Connection(h11.SERVER)
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or type(event) is h11.EndOfMessage:
                break


def h11_setup() -> None:
    h11.Connection(h11.SERVER)


# ---------------------------------------------------------------------------- twisted.web


class _QuietRequest(http.Request):
    """A request that is parsed and then left alone (no response is rendered)."""

    def process(self) -> None:
        pass


def _twisted_channel() -> http.HTTPChannel:
    channel = http.HTTPChannel()
    channel.requestFactory = _QuietRequest
    channel.timeOut = None  # no reactor timers
    channel.makeConnection(StringTransport())
    return channel


def twisted_fresh(data: bytes) -> None:
    channel = _twisted_channel()
    channel.dataReceived(data)
    assert channel.requests, "twisted.web did not parse the request"


def twisted_chunked_body(pieces: list[bytes]) -> None:
    body: list[bytes] = []
    finished: list[bytes] = []
    decoder = http._ChunkedTransferDecoder(body.append, finished.append)
    for piece in pieces:
        decoder.dataReceived(piece)
    assert finished


def twisted_setup() -> None:
    _twisted_channel()


# ---------------------------------------------------------------------------- timing


def best_microseconds(funcs: list[Callable[[], None]], rounds: int) -> list[float]:
    """Best time per call of each function, measured in interleaved short rounds.

    Interleaving and taking the minimum keeps the comparison fair on a shared, noisy machine:
    every contender gets the same chances at an undisturbed time slice.
    """
    timers = [timeit.Timer(func) for func in funcs]
    numbers = [max(1, timer.autorange()[0] // 10) for timer in timers]  # ~20 ms per round
    best = [float("inf")] * len(funcs)
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.timeit(numbers[i]) / numbers[i])
    return [seconds * 1e6 for seconds in best]


def main(argv: list[str]) -> None:
    rounds = 5 if "--quick" in argv else 25
    h11_setup_us, twisted_setup_us = best_microseconds([h11_setup, twisted_setup], rounds)
    setups = [0.0, 0.0, 0.0, h11_setup_us, twisted_setup_us]  # httptools' parser is reused
    samples = [
        ("browser GET, 13 headers", BROWSER_GET),
        ("POST, Content-Length", POST_LENGTH),
        ("POST, chunked (2 chunks)", POST_CHUNKED),
    ]
    names = ["ours (http1)", "ours + target + hop-by-hop", "httptools (llhttp)", "h11",
             "twisted.web HTTPChannel"]
    print(f"Python {sys.version.split()[0]}; httptools {httptools.__version__}, "
          f"h11 {h11.__version__}; µs per message, best of {rounds} interleaved rounds")
    print(f"per-connection setup: h11 Connection {h11_setup_us:.2f} µs, "
          f"twisted.web HTTPChannel {twisted_setup_us:.2f} µs (subtracted in 'net')\n")
    header = f"{'sample':26} {'parser':28} {'µs':>8} {'net':>8} {'× ours':>7}"
    print(header)
    print("-" * len(header))
    for label, data in samples:
        funcs = [ours, ours_with_target, httptools_reused, h11_fresh, twisted_fresh]
        for func in funcs:
            func(data)  # every parser must accept the sample before it is timed
        totals = best_microseconds([lambda f=func: f(data) for func in funcs], rounds)
        mine = totals[0]
        for name, total, setup in zip(names, totals, setups):
            net = total - setup
            print(f"{label:26} {name:28} {total:8.2f} {net:8.2f} {net / mine:7.2f}")
        print()

    pieces = segments(BIG_CHUNKED_BODY)
    head_only = BIG_CHUNKED[:BIG_CHUNKED.index(b"\r\n\r\n") + 4]
    print(f"chunked body: {len(BODY_CHUNK) * 16 // 1024} KiB in 16 chunks, "
          f"fed in {len(pieces)} reads of {SEGMENT} bytes "
          f"(httptools and h11 also parse the {len(head_only)}-byte head first)")
    body_rows = [
        ("ours (ChunkedDecoder)", ours_chunked_body, pieces),
        ("httptools (llhttp)", httptools_chunked_body, [head_only, *pieces]),
        ("h11", h11_chunked_body, [head_only, *pieces]),
        ("twisted _ChunkedTransferDecoder", twisted_chunked_body, pieces),
    ]
    results = best_microseconds([lambda f=func, p=feed: f(p) for _, func, feed in body_rows],
                                rounds)
    header = f"{'parser':34} {'µs':>9} {'MB/s':>8} {'× ours':>7}"
    print(header)
    print("-" * len(header))
    for (name, _, _), micros in zip(body_rows, results):
        print(f"{name:34} {micros:9.1f} {len(BIG_CHUNKED_BODY) / micros:8.0f} "
              f"{micros / results[0]:7.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
