"""Tables for the chunked transfer coding: decoding in any split, strict refusals, encoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safesquid_tw.proxy.chunked import LAST_CHUNK, ChunkedDecoder, chunk_header, encode_chunk
from safesquid_tw.proxy.httpsyntax import ProtocolError


def raises(status: int, detail: str):
    return pytest.raises(ProtocolError, match=detail) if detail else pytest.raises(ProtocolError)


def status_of(excinfo) -> int:
    return excinfo.value.status


def decode_all(data: bytes, **limits) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder(**limits)
    body = b"".join(decoder.feed(data))
    return body, decoder


@pytest.mark.parametrize("data, body, trailers, rest", [
    (b"0\r\n\r\n", b"", [], b""),
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello", [], b""),
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT", b"hello world", [], b"NEXT"),
    (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", [], b""),
    (b"a\r\n0123456789\r\n000\r\n\r\n", b"0123456789", [], b""),
    (b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello", [], b""),
    (b"5;name\r\nhello\r\n0\r\n\r\n", b"hello", [], b""),
    (b"5 ; name = value ;n2\r\nhello\r\n0;last\r\n\r\n", b"hello", [], b""),
    (b'5;name="quoted \\" ;value"\r\nhello\r\n0\r\n\r\n', b"hello", [], b""),
    (b"2\r\n\r\n\r\n0\r\n\r\n", b"\r\n", [], b""),
    (b"0\r\nX-Sum: abc \r\nY:z\r\n\r\nrest", b"", [(b"X-Sum", b"abc"), (b"Y", b"z")], b"rest"),
])
def test_chunked_decodes(data, body, trailers, rest):
    got, decoder = decode_all(data)
    assert got == body
    assert decoder.done
    assert decoder.trailers == trailers
    assert decoder.take_rest() == rest
    assert decoder.take_rest() == b""


@pytest.mark.parametrize("data, detail", [
    (b" 5\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"\t5\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"5 \r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"+5\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"-5\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"g\r\n", "malformed chunk size"),
    (b"5_0\r\n", "malformed chunk size"),
    (b"00000000000000005\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),   # 17 digits
    (b"5;\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"5;a=\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b'5;a="unterminated\r\nhello\r\n0\r\n\r\n', "malformed chunk size"),
    (b"5;a=b c\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"5;a\x00\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
    (b"5\rX\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),     # bare CR in the line
    (b"5\rX\nhello\r\n0\r\n\r\n", "bare LF"),
    (b"5\nhello\r\n0\r\n\r\n", "bare LF"),
    (b"\n", "bare LF"),
    (b"5\r\nhello\n0\r\n\r\n", "missing CRLF"),
    (b"5\r\nhelloX\r\n0\r\n\r\n", "missing CRLF"),
    (b"5\r\nhello\rX", "missing CRLF"),
    (b"5\r\nhello\r\n0\n\r\n", "bare LF"),
    (b"5\r\nhello\r\n0\r\n\n", "bare LF"),
    (b"0\r\nX: a\n\r\n", "bare LF"),
    (b"0\r\n folded\r\n\r\n", "obsolete line folding"),
    (b"0\r\nX : a\r\n\r\n", "whitespace between"),
    (b"0\r\nX: a\x01\r\n\r\n", "header value"),
    (b"0\r\nno colon\r\n\r\n", "without a colon"),
    (b"1;" + b"x" * 100 + b"\r\n", "too long"),
    (b"1;" + b"x" * 100, "too long"),                  # refused before the line ends
    (b"0\r\n" + b"X: " + b"y" * 300 + b"\r\n\r\n", "trailer section too large"),
    (b"0\r\n" + b"X: y\r\n" * 60 + b"\r\n", "trailer section too large"),
    (b"0\r\n" + b"X: " + b"y" * 300, "trailer section too large"),
])
def test_chunked_rejects(data, detail):
    decoder = ChunkedDecoder(max_line=64, max_trailer_bytes=256)
    with raises(400, detail) as excinfo:
        decoder.feed(data)
    assert status_of(excinfo) == 400


def test_chunked_limits_are_inclusive():
    line = b"1;" + b"x" * 62
    body, decoder = decode_all(line + b"\r\na\r\n0\r\n\r\n", max_line=64)
    assert body == b"a" and decoder.done
    trailer = b"X: " + b"y" * 9 + b"\r\n\r\n"  # 14 + 2 bytes
    _, decoder = decode_all(b"0\r\n" + trailer, max_trailer_bytes=len(trailer))
    assert decoder.done
    with raises(400, "trailer"):
        decode_all(b"0\r\n" + trailer, max_trailer_bytes=len(trailer) - 1)


def test_chunked_incomplete_is_not_done():
    body, decoder = decode_all(b"5\r\nhel")
    assert body == b"hel" and not decoder.done
    assert b"".join(decoder.feed(b"lo\r\n0\r\n\r")) == b"lo" and not decoder.done
    assert decoder.feed(b"\n") == [] and decoder.done


def test_chunked_after_done_keeps_everything_for_the_caller():
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\nGET ")
    decoder.feed(b"http://a/ HTTP/1.1")
    assert decoder.take_rest() == b"GET http://a/ HTTP/1.1"


def test_chunked_large_piece_is_not_copied():
    decoder = ChunkedDecoder()
    decoder.feed(b"10000\r\n")
    piece = b"x" * 0x10000
    assert decoder.feed(piece)[0] is piece


CHUNKED_CASE = (b"5;ext=1\r\nhello\r\n1a\r\n" + b"z" * 26 + b"\r\n" + b"0\r\nT: v\r\n\r\nNEXT")


def test_chunked_byte_at_a_time():
    decoder = ChunkedDecoder()
    pieces = []
    for i in range(len(CHUNKED_CASE)):
        pieces += decoder.feed(CHUNKED_CASE[i:i + 1])
    assert b"".join(pieces) == b"hello" + b"z" * 26
    assert decoder.done and decoder.trailers == [(b"T", b"v")]
    assert decoder.take_rest() == b"NEXT"


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(min_value=1, max_value=len(CHUNKED_CASE) - 1), max_size=20))
def test_chunked_any_split_decodes_the_same(cuts):
    decoder = ChunkedDecoder()
    bounds = [0, *sorted(cuts), len(CHUNKED_CASE)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        pieces += decoder.feed(CHUNKED_CASE[a:b])
    assert b"".join(pieces) == b"hello" + b"z" * 26
    assert decoder.done and decoder.trailers == [(b"T", b"v")]
    assert decoder.take_rest() == b"NEXT"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=8),
       st.sets(st.integers(min_value=1, max_value=400), max_size=10))
def test_chunked_roundtrip(chunks, cuts):
    encoded = b"".join(encode_chunk(c) for c in chunks) + LAST_CHUNK + b"tail"
    decoder = ChunkedDecoder()
    bounds = [0, *sorted(c for c in cuts if c < len(encoded)), len(encoded)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        pieces += decoder.feed(encoded[a:b])
    assert b"".join(pieces) == b"".join(chunks)
    assert decoder.done and decoder.take_rest() == b"tail"


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=1, max_value=20), max_size=8))
def test_chunked_bad_crlf_after_data_is_refused_in_any_split(cuts):
    data = b"5\r\nhelloXY0\r\n\r\n"
    decoder = ChunkedDecoder()
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    with raises(400, "missing CRLF"):
        for a, b in zip(bounds, bounds[1:]):
            decoder.feed(data[a:b])


def test_encode_chunk():
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert encode_chunk(b"") == b""
    assert chunk_header(4096) == b"1000\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"

# ---------------------------------------------------------------------------- robustness


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(
    [b"0", b"5", b"a", b";x", b"=y", b'"q"', b"\r\n", b"\r", b"\n", b"hello", b"X: y"]),
    max_size=30).map(b"".join)))
def test_chunked_decoder_raises_only_protocol_errors(data):
    decoder = ChunkedDecoder(max_line=32, max_trailer_bytes=64)
    try:
        decoder.feed(data)
    except ProtocolError as e:
        assert e.status == 400
