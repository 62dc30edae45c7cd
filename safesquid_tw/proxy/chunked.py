"""Chunked transfer coding (RFC 9112 7.1): an incremental decoder and the encoding helpers.

Pure functions over bytes (no Twisted). The decoder is as strict as the head parser: a size
line, CRLF or trailer field that two implementations could read differently is refused.

Typical use by a connection protocol whose framing is "chunked"::

    decoder = ChunkedDecoder()
    for piece in decoder.feed(data):                             # any split of the body bytes
        forward(piece)
    if decoder.done:
        rest = decoder.take_rest()                               # the next pipelined message
"""

from __future__ import annotations

import re

from safesquid_tw.proxy.httpsyntax import FIELD_LINE, TCHAR, ProtocolError, diagnose_field_line

__all__ = ["LAST_CHUNK", "ChunkedDecoder", "chunk_header", "encode_chunk"]

_QUOTED_STRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 9112 7.1: chunk-size [ chunk-ext ]; BWS is allowed only around ";" and "=".
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*[" + TCHAR + rb"]+"
    rb"(?:[ \t]*=[ \t]*(?:[" + TCHAR + rb"]+|" + _QUOTED_STRING + rb"))?)*"
)

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Incremental decoder of a chunked body (RFC 9112 7.1); feed it bytes in any split.

    ``feed`` returns the payload pieces decoded so far. Once ``done``, ``trailers`` holds the
    trailer fields (checked like header fields; never merge them into the header section, RFC
    9110 6.5.1) and ``take_rest()`` the bytes that followed the body. Errors raise
    ProtocolError(400); a response forwarder reports them as 502.
    """

    __slots__ = ("_max_line", "_max_trailer", "_state", "_remaining", "_pending",
                 "_trailer_bytes", "_rest", "trailers")

    def __init__(self, max_line: int = 4096, max_trailer_bytes: int = 16384) -> None:
        self._max_line = max_line
        self._max_trailer = max_trailer_bytes
        self._state = _SIZE
        self._remaining = 0
        self._pending = b""  # an incomplete line (or lone CR) carried to the next feed
        self._trailer_bytes = 0
        self._rest = b""
        self.trailers: list[tuple[bytes, bytes]] = []

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def take_rest(self) -> bytes:
        rest, self._rest = self._rest, b""
        return rest

    def feed(self, data: bytes) -> list[bytes]:
        if not isinstance(data, bytes):
            data = bytes(data)
        if self._state == _DONE:
            self._rest += data
            return []
        buf = self._pending + data if self._pending else data
        self._pending = b""
        pos, end = 0, len(buf)
        out: list[bytes] = []
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                out.append(buf if take == end else buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _SIZE:
                nl = buf.find(b"\n", pos, pos + self._max_line + 2)
                if nl == -1:
                    if end - pos >= self._max_line + 2:
                        raise ProtocolError(400, "chunk size line too long")
                    break
                if nl == pos or buf[nl - 1] != 13:
                    raise ProtocolError(400, "bare LF in chunked body")
                m = _CHUNK_SIZE_LINE.fullmatch(buf, pos, nl - 1)
                if m is None:
                    raise ProtocolError(400, "malformed chunk size line")
                size = int(m.group(1), 16)
                pos = nl + 1
                if size:
                    self._state, self._remaining = _DATA, size
                else:
                    self._state = _TRAILER
            elif state == _DATA_END:
                if buf[pos] != 13 or (end - pos > 1 and buf[pos + 1] != 10):
                    raise ProtocolError(400, "missing CRLF after chunk data")
                if end - pos < 2:
                    break
                pos += 2
                self._state = _SIZE
            else:  # _TRAILER
                next_pos = self._trailer_line(buf, pos, end)
                if next_pos < 0:
                    break
                pos = next_pos
                if self._state == _DONE:
                    self._rest = buf[pos:]
                    return out
        if pos < end:
            self._pending = buf[pos:]
        return out

    def _trailer_line(self, buf: bytes, pos: int, end: int) -> int:
        """Consume one trailer line; return the new position, or -1 to wait for more."""
        budget = self._max_trailer - self._trailer_bytes
        nl = buf.find(b"\n", pos, pos + budget)
        if nl == -1:
            if end - pos >= budget:
                raise ProtocolError(400, "trailer section too large")
            return -1
        if nl == pos or buf[nl - 1] != 13:
            raise ProtocolError(400, "bare LF in chunked trailer")
        self._trailer_bytes += nl + 1 - pos
        if nl - 1 == pos:
            self._state = _DONE
        else:
            line = buf[pos:nl - 1]
            m = FIELD_LINE.fullmatch(line)
            if m is None:
                raise ProtocolError(400, "trailer: " + diagnose_field_line(line))
            self.trailers.append((m.group(1), m.group(2).rstrip(b" \t")))
        return nl + 1


LAST_CHUNK = b"0\r\n\r\n"


def chunk_header(size: int) -> bytes:
    """The size line of a chunk of ``size`` bytes (for writeSequence without copying data)."""
    return b"%x\r\n" % size


def encode_chunk(data: bytes) -> bytes:
    """One chunk carrying ``data``; b"" for empty data (an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)