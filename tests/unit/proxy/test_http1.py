"""Tables for the strict HTTP/1.1 wire layer: heads, framing, serialisation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safesquid_tw.proxy.http1 import (
    ChunkedDecoder, Framing, ProtocolError, RequestHead, leading_empty_lines, parse_request_head,
    parse_response_head, request_framing, response_framing, serialize_request_head,
    serialize_response_head, split_head,
)

LINE, HEAD = 8192, 65536


def read_request(data: bytes) -> tuple[RequestHead, bytes, bytes]:
    """What the front door does: split, parse, frame, read the body; returns (head, body, rest)."""
    end = split_head(data, LINE, HEAD)
    assert end != -1, "head incomplete"
    head = parse_request_head(data[:end])
    framing = request_framing(head)
    rest = data[end:]
    if framing.kind == "length":
        return head, rest[:framing.length], rest[framing.length:]
    if framing.kind == "chunked":
        decoder = ChunkedDecoder()
        body = b"".join(decoder.feed(rest))
        assert decoder.done, "chunked body incomplete"
        return head, body, decoder.take_rest()
    return head, b"", rest


def raises(status: int, detail: str):
    return pytest.raises(ProtocolError, match=detail) if detail else pytest.raises(ProtocolError)


def status_of(excinfo) -> int:
    return excinfo.value.status


# ---------------------------------------------------------------------------- split_head

GET = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"


@pytest.mark.parametrize("buf, expected", [
    (GET, len(GET)),
    (GET + b"GET http://b/ HTTP/1.1\r\n", len(GET)),           # pipelined bytes stay after
    (GET + b"\x00\nbody bytes are not checked", len(GET)),
    (b"\r\n\r\n" + GET, 4 + len(GET)),                         # leading empty lines tolerated
    (GET[:-1], -1),
    (GET[:-2], -1),
    (b"GET http://example.com/ HTTP/1.1\r", -1),               # CR waiting for its LF
    (b"", -1),
    (b"\r\n", -1),
    (b"\r\n\r\n", -1),                                         # only empty lines so far
    (b"GET http://a/ HTTP/1.1\r\n\r\n", len(b"GET http://a/ HTTP/1.1\r\n\r\n")),
])
def test_split_head_finds_end(buf, expected):
    assert split_head(buf, LINE, HEAD) == expected
    assert split_head(bytearray(buf), LINE, HEAD) == expected


@pytest.mark.parametrize("buf, status, detail", [
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400, "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400, "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: a\n\n", 400, "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400, "bare CR"),
    (b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", 400, "bare CR"),
    (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", 400, "NUL"),
    (b"GET / HTTP/1.1\r\nHost: a\x00", 400, "NUL"),            # seen before the head is complete
    (b"GET / HTTP/1.1\r\nX: \n", 400, "bare LF"),
    (b"\n\r\nGET / HTTP/1.1\r\n\r\n", 400, "bare LF"),
    (b"GET /" + b"a" * 100, 414, "request line"),             # incomplete, already too long
    (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n\r\n", 414, "request line"),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 40, 431, "too large"),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 40 + b"\r\n", 431, "too large"),
    (b"\r\n" * 200, 431, "too large"),
])
def test_split_head_rejects(buf, status, detail):
    with raises(status, detail) as excinfo:
        split_head(buf, 64, 200)
    assert status_of(excinfo) == status


def test_split_head_limits_are_inclusive():
    line = b"GET /" + b"a" * 50 + b" HTTP/1.1"
    head = line + b"\r\nX: y\r\n\r\n"
    assert split_head(head, len(line), len(head)) == len(head)
    with raises(414, ""):
        split_head(head, len(line) - 1, len(head))
    with raises(431, ""):
        split_head(head, len(line), len(head) - 1)


def test_leading_empty_lines():
    assert leading_empty_lines(b"\r\n\r\nGET") == 4
    assert leading_empty_lines(b"GET") == 0
    assert leading_empty_lines(b"\r\n\r") == 2


def _trickle(data: bytes, sizes: list[int]) -> int:
    """Feed ``data`` in pieces of ``sizes`` using ``scanned``, as a protocol would."""
    buf = bytearray()
    scanned = 0
    pos = 0
    for size in sizes + [len(data)]:
        buf += data[pos:pos + max(size, 1)]
        pos += max(size, 1)
        end = split_head(buf, LINE, HEAD, scanned)
        if end != -1:
            return end
        scanned = len(buf)
        if pos >= len(data):
            return -1
    return -1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=7), max_size=60))
def test_split_head_trickle_matches_one_shot(sizes):
    data = b"\r\n" + GET + b"POST"
    assert _trickle(data, sizes) == split_head(data, LINE, HEAD) == 2 + len(GET)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5), max_size=60),
       st.sampled_from([b"\rX", b"\nX", b"\x00", b"a\r\rb"]))
def test_split_head_trickle_still_rejects(sizes, bad):
    data = b"GET / HTTP/1.1\r\nX-A: 1" + bad + b"\r\nX-B: 2\r\n\r\n"
    with pytest.raises(ProtocolError) as excinfo:
        _trickle(data, sizes)
    assert excinfo.value.status == 400


def test_split_head_one_byte_at_a_time():
    buf = bytearray()
    results = []
    for i in range(len(GET)):
        buf.append(GET[i])
        results.append(split_head(buf, LINE, HEAD, len(buf) - 1))
    assert results == [-1] * (len(GET) - 1) + [len(GET)]


# ---------------------------------------------------------------------------- request heads


def test_parse_request_head_fields():
    raw = (b"\r\nGET http://example.com/a?b HTTP/1.1\r\nHost: example.com\r\n"
           b"Accept:  text/html \t\r\nX-Empty:\r\nx-multi: 1\r\nX-Multi: 2\r\n"
           b"X-Obs: caf\xc3\xa9\r\n\r\n")
    head = parse_request_head(raw)
    assert (head.method, head.target, head.version) == (
        b"GET", b"http://example.com/a?b", b"HTTP/1.1")
    assert head.headers == (
        (b"Host", b"example.com"), (b"Accept", b"text/html"), (b"X-Empty", b""),
        (b"x-multi", b"1"), (b"X-Multi", b"2"), (b"X-Obs", b"caf\xc3\xa9"))
    assert head.get(b"accept") == b"text/html"
    assert head.get(b"x-multi") == b"1"
    assert head.get_all(b"x-multi") == [b"1", b"2"]
    assert head.get(b"missing") is None
    assert head.has(b"x-empty") and not head.has(b"missing")
    assert head.get_all(b"missing") == []
    head.get_all(b"x-multi").append(b"3")
    assert head.get_all(b"x-multi") == [b"1", b"2"]


def test_request_head_built_directly_has_lookups():
    head = RequestHead(b"GET", b"http://a/", b"HTTP/1.1", ((b"Host", b"a"),))
    assert head.get(b"host") == b"a"
    assert head == parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")


@pytest.mark.parametrize("raw, status, detail", [
    # request line
    (b"GET http://a/ HTTP/1.1 extra", 400, "malformed request line"),
    (b"GET  http://a/ HTTP/1.1", 400, "malformed request line"),
    (b"GET http://a/  HTTP/1.1", 400, "malformed request line"),
    (b"GET http://a/b c HTTP/1.1", 400, "malformed request line"),
    (b"GET http://a/\tHTTP/1.1", 400, "malformed request line"),
    (b" GET http://a/ HTTP/1.1", 400, "malformed request line"),
    (b"GET http://a/ HTTP/1.1 ", 400, "malformed request line"),
    (b"GET", 400, "malformed request line"),
    (b"G(T http://a/ HTTP/1.1", 400, "invalid method"),
    (b"G\xc3\x89T http://a/ HTTP/1.1", 400, "invalid method"),
    (b"GET http://a/\x7f HTTP/1.1", 400, "request target"),
    (b"GET http://a/\xc3\xa9 HTTP/1.1", 400, "request target"),
    (b"GET http://a/ HTTP/1.1\x0b", 400, "HTTP version"),
    (b"GET http://a/ http/1.1", 400, "HTTP version"),
    (b"GET http://a/ HTTP/1.10", 400, "HTTP version"),
    (b"GET http://a/ HTTP/11", 400, "HTTP version"),
    (b"GET http://a/ HTTP/2.0", 505, "not supported"),
    (b"GET http://a/ HTTP/0.9", 505, "not supported"),
    (b"GET http://a/ HTTP/1.2", 505, "not supported"),
    # field lines
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n folded", 400, "obsolete line folding"),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\tfolded", 400, "obsolete line folding"),
    (b"GET http://a/ HTTP/1.1\r\n Host: a", 400, "obsolete line folding"),
    (b"GET http://a/ HTTP/1.1\r\nHost : a", 400, "whitespace between header name and colon"),
    (b"GET http://a/ HTTP/1.1\r\nHost\t: a", 400, "whitespace between header name and colon"),
    (b"GET http://a/ HTTP/1.1\r\n: a", 400, "empty header name"),
    (b"GET http://a/ HTTP/1.1\r\nHost a", 400, "without a colon"),
    (b"GET http://a/ HTTP/1.1\r\nHo(st: a", 400, "header name"),
    (b"GET http://a/ HTTP/1.1\r\nH\xc3\xb6st: a", 400, "header name"),
    (b"GET http://a/ HTTP/1.1\r\nX: a\x01b", 400, "header value"),
    (b"GET http://a/ HTTP/1.1\r\nX: a\x7fb", 400, "header value"),
    (b"GET http://a/ HTTP/1.1\r\nX: a\x00b", 400, "header value"),
    (b"GET http://a/ HTTP/1.1\r\nX: a\rb", 400, "header value"),
    (b"GET http://a/ HTTP/1.1\r\nX: a\nY: b", 400, "header value"),
    (b"GET http://a/ HTTP/1.1\r\nX: a\x1bb", 400, "header value"),
])
def test_parse_request_head_rejects(raw, status, detail):
    with raises(status, detail) as excinfo:
        parse_request_head(raw + b"\r\n\r\n")
    assert status_of(excinfo) == status


def test_parse_request_head_needs_complete_head():
    with raises(400, "incomplete"):
        parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n")


def test_too_many_headers():
    raw = b"GET http://a/ HTTP/1.1\r\n" + b"X: y\r\n" * 5 + b"\r\n"
    assert len(parse_request_head(raw, max_headers=5).headers) == 5
    with raises(431, "header fields") as excinfo:
        parse_request_head(raw, max_headers=4)
    assert status_of(excinfo) == 431


def test_tab_in_value_is_kept_and_ows_stripped():
    head = parse_request_head(b"GET http://a/ HTTP/1.1\r\nX:\t a\tb \t\r\n\r\n")
    assert head.headers == ((b"X", b"a\tb"),)


# ---------------------------------------------------------------------------- request framing


def _framing(*fields: bytes, version: bytes = b"HTTP/1.1") -> Framing:
    raw = b"POST http://a/ " + version + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    return request_framing(parse_request_head(raw))


@pytest.mark.parametrize("fields, expected", [
    ((), Framing("none")),
    ((b"Content-Length: 0",), Framing("length", 0)),
    ((b"Content-Length: 42",), Framing("length", 42)),
    ((b"content-length:   7  ",), Framing("length", 7)),
    ((b"Content-Length: 007",), Framing("length", 7)),
    ((b"Content-Length: 9223372036854775807",), Framing("length", 2**63 - 1)),
    ((b"Transfer-Encoding: chunked",), Framing("chunked")),
    ((b"Transfer-Encoding: CHUNKED",), Framing("chunked")),
    ((b"transfer-encoding:  chunked ",), Framing("chunked")),
])
def test_request_framing_accepts(fields, expected):
    assert _framing(*fields) == expected


@pytest.mark.parametrize("fields, version, status, detail", [
    # CL.TE / TE.CL: both present, in either order
    ((b"Content-Length: 5", b"Transfer-Encoding: chunked"), b"HTTP/1.1", 400, "conflicting"),
    ((b"Transfer-Encoding: chunked", b"Content-Length: 5"), b"HTTP/1.1", 400, "conflicting"),
    ((b"Transfer-Encoding: chunked", b"Content-Length: 0"), b"HTTP/1.1", 400, "conflicting"),
    # Content-Length
    ((b"Content-Length: +1",), b"HTTP/1.1", 400, "invalid Content-Length"),
    ((b"Content-Length: -1",), b"HTTP/1.1", 400, "invalid Content-Length"),
    ((b"Content-Length: 1 2",), b"HTTP/1.1", 400, "invalid Content-Length"),
    ((b"Content-Length: 1_000",), b"HTTP/1.1", 400, "invalid Content-Length"),
    ((b"Content-Length: 0x10",), b"HTTP/1.1", 400, "invalid Content-Length"),
    ((b"Content-Length: 5, 5",), b"HTTP/1.1", 400, "invalid Content-Length"),
    ((b"Content-Length: 5,5",), b"HTTP/1.1", 400, "invalid Content-Length"),
    ((b"Content-Length:",), b"HTTP/1.1", 400, "invalid Content-Length"),
    ((b"Content-Length: \xd9\xa3",), b"HTTP/1.1", 400, "invalid Content-Length"),  # Arabic 3
    ((b"Content-Length: 5", b"Content-Length: 5"), b"HTTP/1.1", 400, "more than one"),
    ((b"Content-Length: 5", b"content-length: 6"), b"HTTP/1.1", 400, "more than one"),
    ((b"Content-Length: 9223372036854775808",), b"HTTP/1.1", 400, "too large"),
    ((b"Content-Length: " + b"9" * 30,), b"HTTP/1.1", 400, "too large"),
    ((b"Content-Length: " + b"1" * 5000,), b"HTTP/1.1", 400, "too large"),
    # Transfer-Encoding
    ((b"Transfer-Encoding: chunked",), b"HTTP/1.0", 400, "HTTP/1.0"),
    ((b"Transfer-Encoding: xchunked",), b"HTTP/1.1", 400, "not chunked"),
    ((b"Transfer-Encoding: chunkedx",), b"HTTP/1.1", 400, "not chunked"),
    ((b"Transfer-Encoding: chunked, identity",), b"HTTP/1.1", 400, "not chunked"),
    ((b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"), b"HTTP/1.1", 400,
     "not chunked"),
    ((b"Transfer-Encoding: gzip",), b"HTTP/1.1", 400, "not chunked"),
    ((b"Transfer-Encoding: identity",), b"HTTP/1.1", 400, "not chunked"),
    ((b"Transfer-Encoding: chunked, chunked",), b"HTTP/1.1", 400, "more than once"),
    ((b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), b"HTTP/1.1", 400,
     "more than once"),
    ((b"Transfer-Encoding: gzip, chunked",), b"HTTP/1.1", 501, "unsupported transfer coding"),
    ((b"Transfer-Encoding: identity, chunked",), b"HTTP/1.1", 501, "unsupported"),
    ((b"Transfer-Encoding: , chunked",), b"HTTP/1.1", 400, "malformed Transfer-Encoding"),
    ((b"Transfer-Encoding: chunked,",), b"HTTP/1.1", 400, "malformed Transfer-Encoding"),
    ((b"Transfer-Encoding: chunked;q=1",), b"HTTP/1.1", 400, "malformed Transfer-Encoding"),
    ((b'Transfer-Encoding: "chunked"',), b"HTTP/1.1", 400, "malformed Transfer-Encoding"),
    ((b"Transfer-Encoding:",), b"HTTP/1.1", 400, "malformed Transfer-Encoding"),
    ((b"Transfer-Encoding: chunked\xc2\xa0",), b"HTTP/1.1", 400, "malformed Transfer-Encoding"),
])
def test_request_framing_rejects(fields, version, status, detail):
    with raises(status, detail) as excinfo:
        _framing(*fields, version=version)
    assert status_of(excinfo) == status


# The request-smuggling classics, as whole byte streams through the front door's steps.
SMUGGLING = [
    ("CL.TE", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 13\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED", 400),
    ("TE.CL", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
              b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400),
    ("TE obs-fold", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n"
                    b"\r\n0\r\n\r\n", 400),
    ("TE obs-fold value", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nX: y\r\n"
                          b"\tTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE space before colon", b"POST http://a/ HTTP/1.1\r\nHost: a\r\n"
                              b"Transfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("TE xchunked", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n"
                    b"\r\n0\r\n\r\n", 400),
    ("TE chunked, identity", b"POST http://a/ HTTP/1.1\r\nHost: a\r\n"
                             b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("TE vertical tab", b"POST http://a/ HTTP/1.1\r\nHost: a\r\n"
                        b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("TE bare LF", b"POST http://a/ HTTP/1.1\r\nHost: a\nTransfer-Encoding: chunked\r\n"
                   b"\r\n0\r\n\r\n", 400),
    ("TE on HTTP/1.0", b"POST http://a/ HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                       b"\r\n0\r\n\r\n", 400),
    ("duplicate CL", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                     b"Content-Length: 3\r\n\r\nabc", 400),
    ("CL list", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    ("CL +1", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\na", 400),
    ("bare-LF chunk size", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                           b"\r\n3\nabc\r\n0\r\n\r\n", 400),
    ("chunk size leading space", b"POST http://a/ HTTP/1.1\r\nHost: a\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk size 0x", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                      b"\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk data overrun", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                           b"\r\n3\r\nabcd\r\n0\r\n\r\n", 400),
    ("oversize chunk line", b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                            b"\r\n3;" + b"x" * 5000 + b"\r\nabc\r\n0\r\n\r\n", 400),
]


@pytest.mark.parametrize("name, data, status", SMUGGLING, ids=[s[0] for s in SMUGGLING])
def test_smuggling_classics_are_refused(name, data, status):
    with pytest.raises(ProtocolError) as excinfo:
        read_request(data)
    assert excinfo.value.status == status


@pytest.mark.parametrize("data, body, rest", [
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nGET http://b/ HTTP/1.1\r\n", b"",
     b"GET http://b/ HTTP/1.1\r\n"),
    (b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET", b"abc", b"GET"),
    (b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\nGET http://b/", b"abc0123456789abcdef",
     b"GET http://b/"),
])
def test_pipelined_bytes_are_left_for_the_caller(data, body, rest):
    _, got_body, got_rest = read_request(data)
    assert (got_body, got_rest) == (body, rest)


# ---------------------------------------------------------------------------- responses


def test_parse_response_head():
    head = parse_response_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nX: y\r\n\r\n")
    assert (head.version, head.status, head.reason) == (b"HTTP/1.1", 404, b"Not Found")
    assert head.get(b"x") == b"y"
    assert parse_response_head(b"HTTP/1.0 200\r\n\r\n").reason == b""
    assert parse_response_head(b"HTTP/1.1 200 \r\n\r\n").reason == b""
    assert parse_response_head(b"HTTP/1.1 200 Ok \xe9t\xe9\r\n\r\n").reason == b"Ok \xe9t\xe9"


@pytest.mark.parametrize("raw, detail", [
    (b"HTTP/1.1 20 OK", "status line"),
    (b"HTTP/1.1 2000 OK", "status line"),
    (b"HTTP/1.1 OK", "status line"),
    (b"HTTP/1.1  200 OK", "status line"),
    (b"HTTP/1.1 200 O\x01K", "status line"),
    (b"HTTP/1.1 099 Low", "invalid status"),
    (b"HTTP/1.1 600 High", "invalid status"),
    (b"HTTP/2.0 200 OK", "not supported"),
    (b"ICY 200 OK", "status line"),
    (b"HTTP/1.1 200 OK\r\nX : y", "whitespace between"),
    (b"HTTP/1.1 200 OK\r\n folded", "obsolete line folding"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00", "header value"),
    (b"HTTP/1.1 200 OK" + b"\r\nX: y" * 101, "header fields"),
])
def test_parse_response_head_rejects_with_502(raw, detail):
    with raises(502, detail) as excinfo:
        parse_response_head(raw + b"\r\n\r\n")
    assert status_of(excinfo) == 502


def _response_framing(status_line: bytes, *fields: bytes, method: bytes = b"GET") -> Framing:
    raw = status_line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    return response_framing(parse_response_head(raw), method)


@pytest.mark.parametrize("status_line, fields, method, expected", [
    (b"HTTP/1.1 200 OK", (b"Content-Length: 5",), b"GET", Framing("length", 5)),
    (b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked",), b"GET", Framing("chunked")),
    (b"HTTP/1.1 200 OK", (b"Transfer-Encoding: gzip, chunked",), b"GET",
     Framing("chunked", transfer_codings=(b"gzip",))),
    (b"HTTP/1.1 200 OK", (b"Transfer-Encoding: gzip",), b"GET",
     Framing("close", transfer_codings=(b"gzip",))),
    (b"HTTP/1.1 200 OK", (), b"GET", Framing("close")),
    (b"HTTP/1.0 200 OK", (), b"GET", Framing("close")),
    (b"HTTP/1.1 200 OK", (b"Content-Length: 5",), b"HEAD", Framing("none")),
    (b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked",), b"HEAD", Framing("none")),
    (b"HTTP/1.1 100 Continue", (), b"POST", Framing("none")),
    (b"HTTP/1.1 101 Switching Protocols", (), b"GET", Framing("none")),
    (b"HTTP/1.1 204 No Content", (b"Content-Length: 5",), b"GET", Framing("none")),
    (b"HTTP/1.1 304 Not Modified", (b"Content-Length: 500",), b"GET", Framing("none")),
    (b"HTTP/1.1 200 Connection established", (), b"CONNECT", Framing("none")),
    (b"HTTP/1.1 407 Proxy Auth", (b"Content-Length: 5",), b"CONNECT", Framing("length", 5)),
    (b"HTTP/1.1 502 Bad", (), b"CONNECT", Framing("close")),
])
def test_response_framing(status_line, fields, method, expected):
    assert _response_framing(status_line, *fields, method=method) == expected


@pytest.mark.parametrize("status_line, fields, detail", [
    (b"HTTP/1.1 200 OK", (b"Content-Length: 5", b"Transfer-Encoding: chunked"), "conflicting"),
    (b"HTTP/1.1 304 OK", (b"Content-Length: 5", b"Transfer-Encoding: chunked"), "conflicting"),
    (b"HTTP/1.1 200 OK", (b"Content-Length: 5", b"Content-Length: 5"), "more than one"),
    (b"HTTP/1.1 200 OK", (b"Content-Length: 5, 5",), "invalid Content-Length"),
    (b"HTTP/1.1 200 OK", (b"Content-Length: -5",), "invalid Content-Length"),
    (b"HTTP/1.1 200 OK", (b"Content-Length: 99999999999999999999",), "too large"),
    (b"HTTP/1.0 200 OK", (b"Transfer-Encoding: chunked",), "HTTP/1.0"),
    (b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked, chunked",), "more than once"),
    (b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked, gzip",), "not the final"),
    (b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked;x=1",), "malformed"),
])
def test_response_framing_rejects_with_502(status_line, fields, detail):
    with raises(502, detail) as excinfo:
        _response_framing(status_line, *fields)
    assert status_of(excinfo) == 502


# ---------------------------------------------------------------------------- serialising


def test_serialize_request_head_round_trips():
    headers = [(b"Host", b"example.com"), (b"Accept", b"*/*"), (b"X-Empty", b"")]
    raw = serialize_request_head(b"GET", b"/index.html?q=1", headers)
    assert raw == (b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n"
                   b"X-Empty: \r\n\r\n")
    head = parse_request_head(raw)
    assert head.headers == tuple(headers)
    assert split_head(raw, LINE, HEAD) == len(raw)


def test_serialize_response_head_round_trips():
    raw = serialize_response_head(503, b"Service Unavailable", iter([(b"Retry-After", b"5")]),
                                  version=b"HTTP/1.0")
    assert raw == b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 5\r\n\r\n"
    head = parse_response_head(raw)
    assert (head.status, head.reason, head.get(b"retry-after")) == (503, b"Service Unavailable",
                                                                    b"5")


@pytest.mark.parametrize("headers", [
    [(b"X", b"a\r\nSet-Cookie: evil=1")],
    [(b"X", b"a\nb")],
    [(b"X", b"a\rb")],
    [(b"X", b"a\x00b")],
    [(b"X\r\nY", b"a")],
])
def test_serialize_refuses_header_injection(headers):
    with pytest.raises(ValueError):
        serialize_response_head(200, b"OK", headers)
    with pytest.raises(ValueError):
        serialize_request_head(b"GET", b"/", headers)


def test_serialize_refuses_injection_in_start_line():
    with pytest.raises(ValueError):
        serialize_response_head(200, b"OK\r\nX: y", [])
    with pytest.raises(ValueError):
        serialize_request_head(b"GET", b"/\r\nX: y", [])


# ---------------------------------------------------------------------------- robustness

_HEADISH = st.lists(st.sampled_from([
    b"GET", b" ", b"http://a/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\r", b"\n", b":", b"Host",
    b"Transfer-Encoding", b"Content-Length", b"chunked", b"5", b",", b"\t", b"\x00", b"\xff",
]), max_size=40).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=200), _HEADISH))
def test_head_functions_raise_only_protocol_errors(data):
    for call in (lambda: split_head(data, 64, 256),
                 lambda: request_framing(parse_request_head(data + b"\r\n\r\n")),
                 lambda: response_framing(parse_response_head(data + b"\r\n\r\n"), b"GET")):
        try:
            call()
        except ProtocolError as e:
            assert e.status in (400, 414, 431, 501, 502, 505) and e.detail


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.from_regex(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True),
                          st.from_regex(rb"[\x21-\x7e\x80-\xff]([\t \x21-\x7e]{0,20}"
                                        rb"[\x21-\x7e])?", fullmatch=True)),
                max_size=12))
def test_serialized_heads_parse_back(headers):
    raw = serialize_request_head(b"GET", b"http://a/", headers)
    assert split_head(raw, LINE, HEAD) == len(raw)
    assert parse_request_head(raw).headers == tuple(headers)


# -- the field-block cache ------------------------------------------------------------------------


def test_a_cached_field_block_parses_exactly_as_a_new_one():
    from safesquid_tw.proxy import http1

    raw = b"\r\nGET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nAccept:  */* \r\nX-A: 1\r\nx-a: 2\r\n\r\n"
    http1._BLOCK_CACHE.clear()
    http1._LINE_CACHE.clear()
    first = parse_request_head(raw)
    again = parse_request_head(bytearray(raw))
    other_path = parse_request_head(raw.replace(b"/x", b"/y"))  # same block, another request line
    assert first == again and first.lines == again.lines == other_path.lines
    assert other_path.target == b"http://a.test/y" and other_path.headers == first.headers
    assert again.get_all(b"x-a") == [b"1", b"2"] and again.get(b"accept") == b"*/*"
    assert parse_request_head(b"GET / HTTP/1.0\r\n\r\n").headers == ()


def test_the_field_limit_holds_for_a_cached_block_too():
    from safesquid_tw.proxy import http1

    raw = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nA: 1\r\nB: 2\r\n\r\n"
    http1._BLOCK_CACHE.clear()
    parse_request_head(raw, max_headers=10)
    with pytest.raises(ProtocolError) as caught:
        parse_request_head(raw, max_headers=2)
    assert caught.value.status == 431
    with pytest.raises(ProtocolError) as caught:
        parse_response_head(b"HTTP/1.1 200 OK\r\nHost: a.test\r\nA: 1\r\nB: 2\r\n\r\n", max_headers=2)
    assert caught.value.status == 502


def test_a_block_that_fails_is_never_cached_and_the_cache_stays_bounded():
    from safesquid_tw.proxy import http1

    http1._BLOCK_CACHE.clear()
    for _ in range(2):
        with pytest.raises(ProtocolError):
            parse_request_head(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nBad Name: x\r\n\r\n")
    assert not http1._BLOCK_CACHE
    for i in range(http1._BLOCK_CACHE_SIZE + 10):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX-N: %d\r\n\r\n" % i)
    assert len(http1._BLOCK_CACHE) <= http1._BLOCK_CACHE_SIZE
    parse_response_head(b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 3000 + b"\r\n\r\n")
    assert not any(len(block) > http1._BLOCK_CACHE_MAX_BLOCK for block in http1._BLOCK_CACHE)


def test_length_framings_are_shared_and_bounded():
    from safesquid_tw.proxy import http1

    assert http1.length_framing(100) is http1.length_framing(100) == http1.Framing("length", 100)
    for n in range(3000):
        assert http1.length_framing(n).length == n
    assert len(http1._BY_LENGTH) <= 1024


# -- the whole-head cache -------------------------------------------------------------------------


def test_a_cached_head_is_exactly_the_head_parsed_anew():
    from safesquid_tw.proxy import http1

    request = b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nDate: Thu, 03 Dec 2026 15:00:00 GMT\r\nContent-Length: 5\r\n\r\n"
    http1._HEAD_CACHE.clear()
    for raw, parse, fresh in ((request, parse_request_head, http1._parse_request_head),
                              (response, parse_response_head, http1._parse_response_head)):
        first = parse(raw)
        assert parse(bytes(raw)) is first  # the second parse of the same bytes is the cached head
        assert first == fresh(raw, 100) and first.lines == fresh(raw, 100).lines
        assert parse(bytearray(raw)) == first  # a bytearray is parsed anew, with the same result
    # A request and a response never stand for one another.
    with pytest.raises(ProtocolError):
        parse_response_head(request)
    with pytest.raises(ProtocolError):
        parse_request_head(response)


def test_the_head_cache_keeps_the_field_limit_apart_and_no_failure():
    from safesquid_tw.proxy import http1

    raw = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nA: 1\r\nB: 2\r\n\r\n"
    http1._HEAD_CACHE.clear()
    parse_request_head(raw, max_headers=10)
    with pytest.raises(ProtocolError) as caught:
        parse_request_head(raw, max_headers=2)
    assert caught.value.status == 431
    bad = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nBad Name: x\r\n\r\n"
    for _ in range(2):
        with pytest.raises(ProtocolError):
            parse_request_head(bad)
    assert all(key[0] != bad for key in http1._HEAD_CACHE)


def test_the_head_cache_stays_bounded():
    from safesquid_tw.proxy import http1

    http1._HEAD_CACHE.clear()
    for i in range(http1._HEAD_CACHE_SIZE + 10):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX-N: %d\r\n\r\n" % i)
    assert len(http1._HEAD_CACHE) <= http1._HEAD_CACHE_SIZE
    parse_response_head(b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 3000 + b"\r\n\r\n")
    assert not any(len(key[0]) > http1._HEAD_CACHE_MAX for key in http1._HEAD_CACHE)


CONNECT_HEAD = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nUser-Agent: t\r\n\r\n"


def test_a_connect_head_is_parsed_once_and_the_field_limit_still_applies() -> None:
    from safesquid_tw.proxy import http1

    first = http1.parse_request_head(CONNECT_HEAD, 100)
    assert first.get(b"host") == b"example.com:443"
    assert http1.parse_request_head(CONNECT_HEAD, 100) is first
    with pytest.raises(http1.ProtocolError) as caught:
        http1.parse_request_head(CONNECT_HEAD, 1)
    assert caught.value.status == 431


@pytest.mark.parametrize("raw, status", [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # space before the colon
    (b"CONNECT example.com:443 HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    (b"CONNECT  example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"CONNECT example.com:443 HTTP/1.1\r\n folded\r\n\r\n", 400),
])
def test_a_refused_connect_head_is_refused_every_time(raw: bytes, status: int) -> None:
    from safesquid_tw.proxy import http1

    for _ in range(2):
        with pytest.raises(http1.ProtocolError) as caught:
            http1.parse_request_head(raw, 100)
        assert caught.value.status == status


@pytest.mark.parametrize("field", [b"Proxy-Authorization", b"Authorization"])
def test_credentials_are_kept_by_no_cache(field: bytes) -> None:
    """A password sent with a request does not stay in the parser's caches after it."""
    from safesquid_tw.proxy import http1

    line = field + b": Basic YTpi"
    raw = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n" + line + b"\r\n\r\n"
    head = http1.parse_request_head(raw, 100)
    assert head.get(field.lower()) == b"Basic YTpi"
    assert all(key[0] != raw for key in http1._HEAD_CACHE)
    assert all(b"YTpi" not in block for block in http1._BLOCK_CACHE)
    assert line not in http1._LINE_CACHE
