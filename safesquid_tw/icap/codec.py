"""ICAP (RFC 3507) messages as bytes: requests out, responses in. No sockets here.

Requests: `options_request`, and `modification_request` for REQMOD/RESPMOD with the
`Encapsulated` header, the encapsulated HTTP heads and the first body chunk (the preview, with
`ieof` when the preview is the whole body). The rest of the body goes as `encode_chunk` pieces
and `LAST_CHUNK` after the server's `100 Continue`.

Responses: `ResponseParser` is fed bytes as they arrive and yields one `IcapResponse` per complete
message (`100`, `204`, `200` with its encapsulated HTTP head and de-chunked body, errors).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

LAST_CHUNK = b"0\r\n\r\n"
IEOF_CHUNK = b"0; ieof\r\n\r\n"
USER_AGENT = b"safesquid-tw-icap/1"

MAX_HEAD_BYTES = 65536  # an ICAP head, or an encapsulated HTTP head, larger than this is refused
MAX_CHUNK_LINE = 4096


class IcapProtocolError(Exception):
    """The ICAP server sent something this client cannot parse."""


@attrs.frozen
class ServiceUrl:
    host: str
    port: int
    service: str  # the path, e.g. "/avscan"

    @property
    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"icap://{host}:{self.port}{self.service}"

    @property
    def request_uri(self) -> bytes:
        return self.text.encode("ascii")


def parse_service_url(url: str) -> ServiceUrl:
    """`icap://host[:port]/service` (port 1344 by default); ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "icap":
        raise ValueError("must start with icap://")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials")
    try:
        port = parts.port or 1344
    except ValueError as e:
        raise ValueError(f"has a bad port: {e}") from None
    path = parts.path or "/"
    if len(path) < 2:
        raise ValueError("names no service (icap://host:port/service)")
    if parts.fragment:
        raise ValueError("must not have a fragment")
    if parts.query:
        path = f"{path}?{parts.query}"
    return ServiceUrl(parts.hostname, port, path)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def options_request(url: ServiceUrl) -> bytes:
    return (
        b"OPTIONS " + url.request_uri + b" ICAP/1.0\r\n"
        b"Host: " + _host_value(url) + b"\r\n"
        b"User-Agent: " + USER_AGENT + b"\r\n"
        b"Encapsulated: null-body=0\r\n\r\n"
    )


def modification_request(
    method: bytes,
    url: ServiceUrl,
    *,
    http_request_head: bytes,
    http_response_head: bytes | None,
    body_first: bytes | None,
    preview: int | None,
    ieof: bool,
    allow_204: bool = True,
    body_complete: bool = True,
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """The ICAP head, the encapsulated HTTP head(s) and the first body bytes.

    `body_first` None means the HTTP message has no body (`null-body`). With `preview` set, the
    first chunk is the preview of `len(body_first)` bytes (== preview or less), closed with
    `ieof` when it is all there is; without a preview the whole body must be in `body_first`
    and the message is complete (or `body_complete` False: more chunks follow). The heads must end with their blank line.
    """
    if method not in (b"REQMOD", b"RESPMOD"):
        raise ValueError(f"not a modification method: {method!r}")
    parts = [b"req-hdr=0"]
    offset = len(http_request_head)
    if http_response_head is not None:
        parts.append(b"res-hdr=%d" % offset)
        offset += len(http_response_head)
    body_name = b"res-body" if http_response_head is not None else b"req-body"
    parts.append((body_name if body_first is not None else b"null-body") + b"=%d" % offset)
    lines = [
        method + b" " + url.request_uri + b" ICAP/1.0",
        b"Host: " + _host_value(url),
        b"User-Agent: " + USER_AGENT,
        b"Encapsulated: " + b", ".join(parts),
    ]
    if allow_204:
        lines.append(b"Allow: 204")
    if preview is not None and body_first is not None:
        lines.append(b"Preview: %d" % len(body_first))
    for name, value in extra_headers:
        lines.append(name + b": " + value)
    out = [b"\r\n".join(lines), b"\r\n\r\n", http_request_head]
    if http_response_head is not None:
        out.append(http_response_head)
    if body_first is not None:
        if body_first:
            out.append(encode_chunk(body_first))
        if preview is not None:
            out.append(IEOF_CHUNK if ieof else LAST_CHUNK)
        elif body_complete:
            out.append(LAST_CHUNK)
    return b"".join(out)


def _host_value(url: ServiceUrl) -> bytes:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}".encode("ascii")


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------


@attrs.frozen
class HttpHead:
    """An encapsulated HTTP head as the scanner sent it."""

    start_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @property
    def status(self) -> int | None:
        parts = self.start_line.split(b" ", 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            return int(parts[1])
        return None

    @property
    def reason(self) -> bytes:
        parts = self.start_line.split(b" ", 2)
        return parts[2] if len(parts) > 2 else b""

    def get(self, name: bytes) -> bytes | None:
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None


@attrs.frozen
class IcapResponse:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # names as sent; continuation lines joined with "\n"
    http_request: HttpHead | None = None
    http_response: HttpHead | None = None
    body: bytes | None = None  # the de-chunked encapsulated body, None for null-body

    def get(self, name: str) -> str | None:
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None

    def threat(self) -> str | None:
        """The threat a scanner reports, from X-Infection-Found or X-Violations-Found."""
        found = self.get("X-Infection-Found")
        if found:
            for part in found.split(";"):
                key, _, value = part.strip().partition("=")
                if key.strip().lower() == "threat" and value.strip():
                    return value.strip()
        violations = self.get("X-Violations-Found")
        if violations:
            # draft-stecher-icap-subid: a count, then per violation four lines
            # (filename, threat description, problem id, resolution).
            lines = [line.strip() for line in violations.split("\n")]
            if len(lines) >= 3 and lines[2]:
                return lines[2]
            if lines and lines[0] and not lines[0].isdigit():
                return lines[0]
            return "violation"
        return None


def parse_header_block(block: bytes) -> list[tuple[str, str]]:
    """Lines `Name: value`, with continuation lines (leading space/tab) joined by "\n"."""
    headers: list[tuple[str, str]] = []
    for raw in block.split(b"\r\n"):
        if not raw:
            continue
        if raw[:1] in (b" ", b"\t"):
            if not headers:
                raise IcapProtocolError("a continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + raw.strip().decode("latin-1"))
            continue
        name, sep, value = raw.partition(b":")
        if not sep or not name or name != name.strip():
            raise IcapProtocolError(f"a malformed header line: {raw[:80]!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return headers


def parse_encapsulated(value: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    last = -1
    for part in value.split(","):
        name, sep, offset = part.strip().partition("=")
        name = name.strip().lower()
        if not sep or name not in ("req-hdr", "res-hdr", "req-body", "res-body", "null-body", "opt-body"):
            raise IcapProtocolError(f"a malformed Encapsulated header: {value!r}")
        try:
            at = int(offset.strip())
        except ValueError:
            raise IcapProtocolError(f"a malformed Encapsulated offset: {value!r}") from None
        if at < last or at < 0:
            raise IcapProtocolError(f"Encapsulated offsets out of order: {value!r}")
        last = at
        out.append((name, at))
    if not out:
        raise IcapProtocolError("an empty Encapsulated header")
    if any(name.endswith("body") for name, _ in out[:-1]):
        raise IcapProtocolError(f"a body that is not last in Encapsulated: {value!r}")
    return out


def _parse_http_head(raw: bytes) -> HttpHead:
    if not raw.endswith(b"\r\n\r\n"):
        raise IcapProtocolError("an encapsulated HTTP head without its blank line")
    line, _, rest = raw[:-2].partition(b"\r\n")
    return HttpHead(line, tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in parse_header_block(rest)))


class ResponseParser:
    """Incremental: `feed(data)` returns the responses completed by these bytes.

    `max_body` bounds a de-chunked body (a replacement larger than that is a protocol error,
    so a scanner cannot make the proxy hold unbounded memory).
    """

    def __init__(self, max_body: int = 64 * 1048576) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._state = "head"
        self._pending: dict = {}
        self._body = bytearray()
        self._chunk_left = 0
        self._heads_left = 0

    @property
    def idle(self) -> bool:
        """Between messages with nothing buffered."""
        return self._state == "head" and not self._buf

    def feed(self, data: bytes) -> list[IcapResponse]:
        self._buf += data
        out: list[IcapResponse] = []
        while True:
            response = self._step()
            if response is None:
                return out
            out.append(response)

    def _step(self) -> IcapResponse | None:
        while True:
            state = self._state
            if state == "head":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD_BYTES:
                        raise IcapProtocolError("the ICAP response head is too large")
                    return None
                raw = bytes(self._buf[:end])
                del self._buf[: end + 4]
                done = self._start(raw)
                if done is not None:
                    return done
            elif state == "heads":
                if len(self._buf) < self._heads_left:
                    if self._heads_left > MAX_HEAD_BYTES:
                        raise IcapProtocolError("the encapsulated HTTP heads are too large")
                    return None
                raw = bytes(self._buf[: self._heads_left])
                del self._buf[: self._heads_left]
                self._split_heads(raw)
                if self._pending["body_at"] is None:
                    return self._complete()
                self._state = "chunk-size"
            elif state == "chunk-size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    if len(self._buf) > MAX_CHUNK_LINE:
                        raise IcapProtocolError("an ICAP chunk-size line is too long")
                    return None
                line = bytes(self._buf[:end]).split(b";", 1)[0].strip()
                del self._buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise IcapProtocolError(f"a bad ICAP chunk size: {line[:40]!r}") from None
                if size < 0:
                    raise IcapProtocolError("a negative ICAP chunk size")
                if size == 0:
                    self._state = "trailer"
                else:
                    if len(self._body) + size > self.max_body:
                        raise IcapProtocolError(f"the scanner's body is larger than {self.max_body} bytes")
                    self._chunk_left = size
                    self._state = "chunk-data"
            elif state == "chunk-data":
                if not self._buf:
                    return None
                take = min(self._chunk_left, len(self._buf))
                self._body += self._buf[:take]
                del self._buf[:take]
                self._chunk_left -= take
                if self._chunk_left:
                    return None
                self._state = "chunk-end"
            elif state == "chunk-end":
                if len(self._buf) < 2:
                    return None
                if self._buf[:2] != b"\r\n":
                    raise IcapProtocolError("an ICAP chunk not followed by CRLF")
                del self._buf[:2]
                self._state = "chunk-size"
            elif state == "trailer":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return None
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                if not line:
                    return self._complete()

    def _start(self, raw: bytes) -> IcapResponse | None:
        line, _, rest = raw.partition(b"\r\n")
        parts = line.split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"ICAP/1.0" or not parts[1].isdigit() or len(parts[1]) != 3:
            raise IcapProtocolError(f"not an ICAP/1.0 status line: {line[:80]!r}")
        status = int(parts[1])
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        headers = tuple(parse_header_block(rest))
        self._pending = {"status": status, "reason": reason, "headers": headers, "body_at": None,
                         "http_request": None, "http_response": None, "sections": []}
        encapsulated = None
        for n, v in headers:
            if n.lower() == "encapsulated":
                encapsulated = v
        if status == 100 or encapsulated is None:
            return self._complete()
        sections = parse_encapsulated(encapsulated)
        self._pending["sections"] = sections
        last_name, last_at = sections[-1]
        if last_name in ("null-body",) or not last_name.endswith("body"):
            self._pending["body_at"] = None
        else:
            self._pending["body_at"] = last_at
        self._heads_left = last_at
        self._body = bytearray()
        if last_at == 0:
            self._split_heads(b"")
            if self._pending["body_at"] is None:
                return self._complete()
            self._state = "chunk-size"
            return None
        self._state = "heads"
        return None

    def _split_heads(self, raw: bytes) -> None:
        sections = self._pending["sections"]
        for i, (name, at) in enumerate(sections):
            if name.endswith("body"):
                break
            end = sections[i + 1][1]
            head = _parse_http_head(raw[at:end])
            self._pending["http_request" if name == "req-hdr" else "http_response"] = head

    def _complete(self) -> IcapResponse:
        p = self._pending
        body = bytes(self._body) if p.get("body_at") is not None else None
        self._state = "head"
        self._pending = {}
        self._body = bytearray()
        return IcapResponse(p["status"], p["reason"], p["headers"], p["http_request"], p["http_response"], body)


@attrs.frozen
class ServiceOptions:
    """What an OPTIONS answer says about a service (RFC 3507 4.10.2)."""

    methods: frozenset[str]
    istag: str
    preview: int | None
    allow_204: bool
    max_connections: int | None
    ttl: int | None
    transfer_preview: frozenset[str]
    transfer_ignore: frozenset[str]
    transfer_complete: frozenset[str]

    def transfer_mode(self, extension: str) -> str:
        """"ignore", "complete" or "preview" for a file extension (lower case, no dot)."""
        if extension in self.transfer_ignore:
            return "ignore"
        if extension in self.transfer_complete:
            return "complete"
        if extension in self.transfer_preview or "*" in self.transfer_preview:
            return "preview"
        if "*" in self.transfer_complete:
            return "complete"
        if "*" in self.transfer_ignore:
            return "ignore"
        return "preview"


def parse_options(response: IcapResponse) -> ServiceOptions:
    if response.status != 200:
        raise IcapProtocolError(f"OPTIONS answered {response.status} {response.reason}")
    methods = frozenset(m.strip().upper() for m in (response.get("Methods") or "").split(",") if m.strip())
    if not methods:
        raise IcapProtocolError("OPTIONS named no Methods")

    def number(name: str) -> int | None:
        value = response.get(name)
        if value is None:
            return None
        try:
            n = int(value.strip())
        except ValueError:
            raise IcapProtocolError(f"OPTIONS {name} is not a number: {value!r}") from None
        return n if n >= 0 else None

    def extensions(name: str) -> frozenset[str]:
        return frozenset(e.strip().lower() for e in (response.get(name) or "").split(",") if e.strip())

    allow = {a.strip() for a in (response.get("Allow") or "").split(",")}
    return ServiceOptions(
        methods=methods,
        istag=(response.get("ISTag") or "").strip().strip('"'),
        preview=number("Preview"),
        allow_204="204" in allow,
        max_connections=number("Max-Connections"),
        ttl=number("Options-TTL"),
        transfer_preview=extensions("Transfer-Preview"),
        transfer_ignore=extensions("Transfer-Ignore"),
        transfer_complete=extensions("Transfer-Complete"),
    )


__all__ = [
    "IEOF_CHUNK", "LAST_CHUNK", "HttpHead", "IcapProtocolError", "IcapResponse", "ResponseParser",
    "ServiceOptions", "ServiceUrl", "encode_chunk", "modification_request", "options_request",
    "parse_encapsulated", "parse_header_block", "parse_options", "parse_service_url",
]
