"""Strict HTTP/1.1 wire layer: finding and parsing heads, body framing, serialising heads.

Pure functions over bytes (no Twisted). The rules follow RFC 9110/9112 with the strict
choices a proxy needs so that nothing can be smuggled past it: every message whose framing
two implementations could read differently is refused instead of being "repaired".

Typical use by a connection protocol::

    end = split_head(buf, max_request_line, max_head_bytes)      # -1: wait for more bytes
    head = parse_request_head(bytes(buf[:end]))
    framing = request_framing(head)                              # "none" | "length" | "chunked"
    rest = buf[end:]                                             # body bytes / next request

The chunked coding lives in ``chunked`` and the shared field syntax in ``httpsyntax``; their
public names are re-exported here, so ``http1`` stays the one import for the whole wire layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from safesquid_tw.proxy.chunked import LAST_CHUNK, ChunkedDecoder, chunk_header, encode_chunk
from safesquid_tw.proxy.httpsyntax import FIELD_LINE, TCHAR, TOKEN, ProtocolError, diagnose_field_line

__all__ = [
    "CHUNKED", "LAST_CHUNK", "NO_BODY", "UNTIL_CLOSE", "ChunkedDecoder", "Framing",
    "ProtocolError", "RequestHead", "ResponseHead",
    "chunk_header", "encode_chunk", "leading_empty_lines", "parse_request_head",
    "parse_response_head", "request_framing", "response_framing", "serialize_request_head",
    "serialize_response_head", "split_head",
]


# Exactly METHOD SP target SP HTTP/d.d; the target is visible ASCII only.
_REQUEST_LINE = re.compile(rb"([" + TCHAR + rb"]+) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])")
# Reason phrases are optional and some servers omit the SP before an empty one.
_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_LEADING_EMPTY_LINES = re.compile(rb"(?:\r\n)*")
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]+")
_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})
_MAX_CONTENT_LENGTH = 2**63 - 1

Fields = tuple[tuple[bytes, bytes], ...]


# ---------------------------------------------------------------------------- finding a head


def leading_empty_lines(buf: bytes | bytearray) -> int:
    """Number of bytes of empty lines (CRLF) at the start of ``buf``.

    RFC 9112 2.2 lets a client send empty lines before a request line (old clients add a CRLF
    after a POST body). ``split_head`` and the head parsers skip them on their own; a caller
    whose buffer holds nothing else may drop ``buf[:n]`` to avoid keeping them around.
    """
    return _LEADING_EMPTY_LINES.match(buf).end()


def split_head(
    buf: bytes | bytearray, max_request_line: int, max_head_bytes: int, scanned: int = 0
) -> int:
    """Index just past the CRLFCRLF ending the head at the start of ``buf``, or -1 if incomplete.

    ``buf[:end]`` is the head (possibly starting with empty lines, which the parsers skip);
    ``buf[end:]`` is body or the next pipelined message. Leading empty lines count towards
    ``max_head_bytes``.

    ``scanned`` makes repeated calls linear as bytes trickle in: pass the ``len(buf)`` of the
    previous call that returned -1 on the same buffer and only the new bytes are examined.

    Raises ProtocolError 400 on a bare CR, bare LF or NUL in the head, 414 when the first line
    is longer than ``max_request_line``, 431 when the head exceeds ``max_head_bytes``. The same
    function splits response heads; there every error means 502 to the client.
    """
    size = len(buf)
    # (The usual head starts with its first line: no match to run. min/max written out: this
    # runs for every head, request and response.)
    start = _LEADING_EMPTY_LINES.match(buf).end() if buf.startswith(b"\r\n") else 0
    limit = size if size < max_head_bytes else max_head_bytes
    end = buf.find(b"\r\n\r\n", start if start > scanned - 3 else scanned - 3, limit)
    stop = end + 4 if end != -1 else limit
    check_from = start if start > scanned else scanned
    if check_from > start and buf[check_from - 1] == 13:
        check_from -= 1  # a CR at the old end may pair with an LF that just arrived
    if check_from < stop:
        _check_line_endings(buf, check_from, stop, complete=end != -1)
    eol = buf.find(b"\r\n", start, start + max_request_line + 2)
    if eol == -1 and (end != -1 or size - start >= max_request_line + 2):
        raise ProtocolError(414, "request line too long")
    if end == -1:
        if size >= max_head_bytes:
            raise ProtocolError(431, "request head too large")
        return -1
    return end + 4


def _check_line_endings(buf: bytes | bytearray, begin: int, stop: int, complete: bool) -> None:
    # Counting in C beats a per-byte loop by far: every LF must belong to a CRLF, every CR too
    # (except a final CR still waiting for its LF).
    crlf = buf.count(b"\r\n", begin, stop)
    if buf.count(b"\n", begin, stop) != crlf:
        raise ProtocolError(400, "bare LF in head")
    cr = buf.count(b"\r", begin, stop)
    if cr != crlf and not (not complete and cr == crlf + 1 and buf[stop - 1] == 13):
        raise ProtocolError(400, "bare CR in head")
    if buf.find(b"\x00", begin, stop) != -1:
        raise ProtocolError(400, "NUL byte in head")


# ---------------------------------------------------------------------------- parsed heads


def _index_fields(fields: Fields) -> dict[bytes, list[bytes]]:
    index: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        index.setdefault(name.lower(), []).append(value)
    return index


class _FieldLookup:
    """Case-insensitive lookups through an index built once per head."""

    __slots__ = ()
    _index: dict[bytes, list[bytes]]

    def get(self, lname: bytes) -> bytes | None:
        """First value of the field named ``lname`` (lower-case), or None."""
        values = self._index.get(lname)
        return values[0] if values else None

    def get_all(self, lname: bytes) -> list[bytes]:
        """Every value of the field named ``lname`` (lower-case), in order."""
        return list(self._index.get(lname, ()))

    def has(self, lname: bytes) -> bool:
        return lname in self._index

    def values(self, lname: bytes) -> list[bytes] | None:
        """Every value of the field named ``lname`` (lower-case), or None; not a copy: read only."""
        return self._index.get(lname)


_INDEX = attrs.Factory(lambda self: _index_fields(self.headers), takes_self=True)


@attrs.frozen(slots=True)
class RequestHead(_FieldLookup):
    method: bytes
    target: bytes
    version: bytes
    headers: Fields  # (name as received, value without surrounding OWS), in order
    _index: dict[bytes, list[bytes]] = attrs.field(default=_INDEX, eq=False, repr=False)
    # From the parser: (lower-case name, b"Name: value\r\n") per field, in order, i.e. each field
    # as a forwarded head writes it; None for a head built otherwise (the lean path then builds them).
    lines: tuple[tuple[bytes, bytes], ...] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(slots=True)
class ResponseHead(_FieldLookup):
    version: bytes
    status: int
    reason: bytes
    headers: Fields
    _index: dict[bytes, list[bytes]] = attrs.field(default=_INDEX, eq=False, repr=False)
    lines: tuple[tuple[bytes, bytes], ...] | None = attrs.field(default=None, eq=False, repr=False)  # as RequestHead's


# Field lines seen recently, parsed: (name, value, lower-case name, (lower-case name, the line as
# forwarded)). Most lines of the heads a
# proxy sees repeat verbatim (an origin's Server, Content-Type, ETag; a client's Host, User-Agent,
# Accept), and a dict look-up costs a fraction of the match. The entry is a pure function of the
# line's bytes, so a hit is exactly what matching would give; the cache is emptied when full.
_LINE_CACHE: dict[bytes, tuple[bytes, bytes, bytes, tuple[bytes, bytes]]] = {}
_LINE_CACHE_SIZE = 4096
_LINE_CACHE_MAX_LINE = 256  # longer lines (cookies, tokens) seldom repeat


# Whole field blocks (the head after its first line) seen recently, parsed: a client sends the same
# fields with request after request (User-Agent, Accept..., cookies), an origin the same fields with
# every answer but its Date's second. Like the line cache, an entry is a pure function of the
# block's bytes and only successes are kept; the parsed parts are shared by the heads that hit it,
# which only read them (`values` is documented read-only; fields and lines are tuples).
_BLOCK_CACHE: dict[bytes, tuple[Fields, dict[bytes, list[bytes]], tuple[tuple[bytes, bytes], ...]]] = {}
_BLOCK_CACHE_SIZE = 256
_BLOCK_CACHE_MAX_BLOCK = 2048

# No cache here (lines, blocks, whole heads) keeps a field that carries credentials: a password
# sent with a request does not stay in the node's memory after it, whatever the request was.
_CREDENTIAL_FIELDS = frozenset({b"authorization", b"proxy-authorization"})


def _no_credentials(index: dict[bytes, list[bytes]]) -> bool:
    return b"proxy-authorization" not in index and b"authorization" not in index


def _split_head(raw: bytes | bytearray, status: int) -> tuple[bytes, bytes]:
    """(first line, field block) of a head ending with CRLFCRLF, leading empty lines skipped;
    the block is the field lines joined by CRLF, without the final CRLFCRLF (b"" for none)."""
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    if not raw.endswith(b"\r\n\r\n"):
        raise ProtocolError(status, "incomplete head")
    start = _LEADING_EMPTY_LINES.match(raw).end() if raw.startswith(b"\r\n") else 0
    eol = raw.find(b"\r\n", start)
    if eol < 0:  # nothing but empty lines
        return b"", b""
    return raw[start:eol], raw[eol + 2 : -4]


def _parse_block(
    block: bytes, max_fields: int, status: int, too_many_status: int
) -> tuple[Fields, dict[bytes, list[bytes]], tuple[tuple[bytes, bytes], ...]]:
    parsed = _BLOCK_CACHE.get(block)
    if parsed is None:
        parsed = _parse_fields(block.split(b"\r\n") if block else [], max_fields, status, too_many_status)
        if len(block) <= _BLOCK_CACHE_MAX_BLOCK and _no_credentials(parsed[1]):
            if len(_BLOCK_CACHE) >= _BLOCK_CACHE_SIZE:
                _BLOCK_CACHE.clear()
            _BLOCK_CACHE[block] = parsed
    elif len(parsed[0]) > max_fields:
        raise ProtocolError(too_many_status, f"more than {max_fields} header fields")
    return parsed


def _parse_fields(
    lines: list[bytes], max_fields: int, status: int, too_many_status: int
) -> tuple[Fields, dict[bytes, list[bytes]], tuple[tuple[bytes, bytes], ...]]:
    """The field lines (the head's lines after the first)."""
    if len(lines) > max_fields:
        raise ProtocolError(too_many_status, f"more than {max_fields} header fields")
    fields = []
    forwarded = []
    index: dict[bytes, list[bytes]] = {}
    match = FIELD_LINE.fullmatch
    cache = _LINE_CACHE
    for line in lines:
        parsed = cache.get(line)
        if parsed is None:
            m = match(line)
            if m is None:
                raise ProtocolError(status, diagnose_field_line(line))
            name, value = m.groups()
            value = value.rstrip(b" \t")
            lname = name.lower()
            parsed = (name, value, lname, (lname, name + b": " + value + b"\r\n"))
            if len(line) <= _LINE_CACHE_MAX_LINE and lname not in _CREDENTIAL_FIELDS:
                if len(cache) >= _LINE_CACHE_SIZE:
                    cache.clear()
                cache[line] = parsed
        name, value, lname, as_forwarded = parsed
        fields.append((name, value))
        forwarded.append(as_forwarded)
        seen = index.get(lname)
        if seen is None:
            index[lname] = [value]
        else:
            seen.append(value)
    return tuple(fields), index, tuple(forwarded)


# Whole heads parsed recently, by their bytes and field limit: a client repeats its request head
# byte for byte (the same URL, the same fields), an origin its response head within the second of
# its Date. A head is a pure function of those (heads are frozen; their field tuples and index are
# shared read-only already, see the block cache); only successes are kept; emptied when full.
_HEAD_CACHE: dict[tuple[bytes, int], "RequestHead | ResponseHead"] = {}
_HEAD_CACHE_SIZE = 256
_HEAD_CACHE_MAX = _BLOCK_CACHE_MAX_BLOCK


def _cached_head(raw: bytes, max_headers: int, kind: type, parse) -> "RequestHead | ResponseHead":
    """`parse(raw, max_headers)`, from `_HEAD_CACHE` when these bytes were parsed as `kind` before."""
    if type(raw) is not bytes:
        return parse(raw, max_headers)
    key = (raw, max_headers)
    head = _HEAD_CACHE.get(key)
    if type(head) is kind:
        return head
    head = parse(raw, max_headers)
    if len(raw) <= _HEAD_CACHE_MAX and _no_credentials(head._index):
        if len(_HEAD_CACHE) >= _HEAD_CACHE_SIZE:
            _HEAD_CACHE.clear()
        _HEAD_CACHE[key] = head
    return head


def parse_request_head(raw: bytes, max_headers: int = 100) -> RequestHead:
    """Parse a request head (``raw`` ends with the CRLFCRLF found by ``split_head``).

    Raises ProtocolError: 400 malformed, 431 more than ``max_headers`` fields, 505 version.
    """
    return _cached_head(raw, max_headers, RequestHead, _parse_request_head)


def _parse_request_head(raw: bytes, max_headers: int) -> RequestHead:
    first, block = _split_head(raw, 400)
    m = _REQUEST_LINE.fullmatch(first)
    if m is None:
        raise ProtocolError(400, _diagnose_request_line(first))
    method, target, version = m.groups()
    if version not in _VERSIONS:
        raise ProtocolError(505, f"HTTP version {version.decode()} not supported")
    fields, index, forwarded = _parse_block(block, max_headers, 400, 431)
    return RequestHead(method, target, version, fields, index, forwarded)


def _diagnose_request_line(line: bytes) -> str:
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        return "malformed request line"
    if not TOKEN.fullmatch(parts[0]):
        return "invalid method"
    if not _VISIBLE_ASCII.fullmatch(parts[1]):
        return "invalid character in request target"
    return "malformed HTTP version"


def parse_response_head(raw: bytes, max_headers: int = 100) -> ResponseHead:
    """Parse a response head; every problem raises ProtocolError(502, ...)."""
    return _cached_head(raw, max_headers, ResponseHead, _parse_response_head)


def _parse_response_head(raw: bytes, max_headers: int) -> ResponseHead:
    first, block = _split_head(raw, 502)
    m = _STATUS_LINE.fullmatch(first)
    if m is None:
        raise ProtocolError(502, "malformed status line")
    version, status_text, reason = m.groups()
    if version not in _VERSIONS:
        raise ProtocolError(502, f"upstream HTTP version {version.decode()} not supported")
    status = int(status_text)
    if not 100 <= status <= 599:
        raise ProtocolError(502, f"invalid status code {status}")
    fields, index, forwarded = _parse_block(block, max_headers, 502, 502)
    return ResponseHead(version, status, reason or b"", fields, index, forwarded)


# ---------------------------------------------------------------------------- body framing


@attrs.frozen(slots=True)
class Framing:
    """How a message body is delimited.

    kind: "none" (no body), "length" (``length`` bytes), "chunked", or "close" (until the
    connection closes; responses only). ``transfer_codings`` lists codings other than chunked
    (responses only, in order): a forwarder that drops Transfer-Encoding must re-declare them.
    """

    kind: str
    length: int = 0
    transfer_codings: tuple[bytes, ...] = ()


NO_BODY = Framing("none")
CHUNKED = Framing("chunked")
UNTIL_CLOSE = Framing("close")
_BY_LENGTH: dict[int, Framing] = {}  # Framing("length", n) for lengths seen recently (immutable, shared)


def length_framing(length: int) -> Framing:
    """Framing("length", length), one shared instance per length seen recently."""
    framing = _BY_LENGTH.get(length)
    if framing is None:
        if len(_BY_LENGTH) >= 1024:
            _BY_LENGTH.clear()
        framing = _BY_LENGTH[length] = Framing("length", length)
    return framing


def _content_length(values: list[bytes], status: int) -> int:
    if len(values) != 1:
        raise ProtocolError(status, "more than one Content-Length")
    value = values[0]
    # bytes.isdigit() accepts ASCII digits only: no sign, space, comma or underscore.
    if not value.isdigit():
        raise ProtocolError(status, "invalid Content-Length")
    if len(value) > 19 or int(value) > _MAX_CONTENT_LENGTH:
        raise ProtocolError(status, "Content-Length too large")
    return int(value)


def _transfer_codings(values: list[bytes], status: int) -> list[bytes]:
    codings = []
    for value in values:
        for item in value.split(b","):
            coding = item.strip(b" \t").lower()
            # Empty list members and parameters are refused: no other parser may disagree.
            if not TOKEN.fullmatch(coding):
                raise ProtocolError(status, "malformed Transfer-Encoding")
            codings.append(coding)
    return codings


def request_framing(head: RequestHead) -> Framing:
    """Body framing of a request, refusing anything ambiguous (RFC 9112 6.1-6.3)."""
    te = head._index.get(b"transfer-encoding")
    cl = head._index.get(b"content-length")
    if te:
        if cl:
            raise ProtocolError(400, "conflicting Content-Length and Transfer-Encoding")
        if head.version != b"HTTP/1.1":
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = _transfer_codings(te, 400)
        if codings[-1] != b"chunked":
            raise ProtocolError(400, "final transfer coding is not chunked")
        if len(codings) > 1:
            if b"chunked" in codings[:-1]:
                raise ProtocolError(400, "chunked applied more than once")
            raise ProtocolError(501, "unsupported transfer coding")
        return CHUNKED
    if cl:
        return length_framing(_content_length(cl, 400))
    return NO_BODY


def response_framing(head: ResponseHead, request_method: bytes) -> Framing:
    """Body framing of a response to ``request_method`` (RFC 9112 6.3); bad framing is 502."""
    te = head._index.get(b"transfer-encoding")
    cl = head._index.get(b"content-length")
    if te and cl:
        # An upstream sending both is either broken or attempting response splitting.
        raise ProtocolError(502, "conflicting Content-Length and Transfer-Encoding")
    if cl:
        length = _content_length(cl, 502)
    status = head.status
    if request_method == b"HEAD" or status < 200 or status == 204 or status == 304:
        return NO_BODY
    if request_method == b"CONNECT" and status < 300:
        return NO_BODY  # the connection becomes a tunnel
    if te:
        if head.version != b"HTTP/1.1":
            raise ProtocolError(502, "Transfer-Encoding in an HTTP/1.0 response")
        codings = _transfer_codings(te, 502)
        if codings[-1] == b"chunked":
            others = tuple(codings[:-1])
            if b"chunked" in others:
                raise ProtocolError(502, "chunked applied more than once")
            return Framing("chunked", transfer_codings=others) if others else CHUNKED
        if b"chunked" in codings:
            raise ProtocolError(502, "chunked is not the final transfer coding")
        return Framing("close", transfer_codings=tuple(codings))
    if cl:
        return length_framing(length)
    return UNTIL_CLOSE


# ---------------------------------------------------------------------------- serialising


def _finish_head(parts: list[bytes], headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    lines = 2  # start line and the empty line
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    # Guard against response splitting through a value built from untrusted input: the head
    # must hold exactly one CRLF per line and no other CR, LF or NUL.
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\x00" in head:
        raise ValueError("CR, LF or NUL inside a head field would break message framing")
    return head


def serialize_request_head(
    method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]],
    version: bytes = b"HTTP/1.1",
) -> bytes:
    return _finish_head([method, b" ", target, b" ", version, b"\r\n"], headers)


def serialize_response_head(
    status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]],
    version: bytes = b"HTTP/1.1",
) -> bytes:
    return _finish_head([version, b" %d " % status, reason, b"\r\n"], headers)
