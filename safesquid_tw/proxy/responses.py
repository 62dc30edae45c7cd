"""Responses the proxy makes itself: errors (with RFC 9209 Proxy-Status), block pages, 407s."""

from __future__ import annotations

import re
import time

import attrs

from twisted.web.http import datetimeToString

from safesquid_tw import pages

REASONS: dict[int, bytes] = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    508: b"Loop Detected",
}

TITLES: dict[int, str] = {
    400: "Bad request",
    403: "Access blocked",
    405: "Method not allowed",
    407: "Proxy authentication required",
    408: "Request timeout",
    413: "Request too large",
    421: "Misdirected request",
    414: "URL too long",
    431: "Request headers too large",
    500: "Internal proxy error",
    501: "Not implemented",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
    505: "HTTP version not supported",
    508: "Forwarding loop detected",
}

# Our pages show under a foreign origin: nothing but their own inline stylesheet may run.
_PAGE_SECURITY = (
    b"Content-Security-Policy: " + pages.proxy_page_csp().encode("ascii") + b"\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
)

_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*\Z")


@attrs.frozen(slots=True)
class ProxyFailure(Exception):
    """A request the proxy cannot complete, with what the client and the log should be told."""

    status: int
    error_type: str  # an RFC 9209 error type, e.g. dns_error, connection_refused
    detail: str
    extra: str = ""  # extra Proxy-Status parameters, e.g. 'rcode="NXDOMAIN"'

    def __str__(self) -> str:
        return f"{self.status} {self.error_type}: {self.detail}"


def proxy_status_value(node: str, error_type: str, extra: str = "", details: str | None = None) -> bytes:
    name = node if _TOKEN.match(node) else '"' + node.replace("\\", "\\\\").replace('"', '\\"') + '"'
    value = f"{name}; error={error_type}"
    if extra:
        value += "; " + extra
    if details:
        safe = details.replace("\\", "\\\\").replace('"', '\\"')
        value += f'; details="{safe}"'
    return value.encode("ascii", "replace")


_date_cache: list = [None, b""]


def http_date(now: float | None = None) -> bytes:
    """The IMF-fixdate of this second (RFC 9110 5.6.7), formatted once per second."""
    second = int(time.time() if now is None else now)
    if _date_cache[0] != second:
        _date_cache[0], _date_cache[1] = second, datetimeToString(second)
    return _date_cache[1]


def simple_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/html; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = True,
    version: bytes = b"HTTP/1.1",
    head_only: bool = False,
) -> bytes:
    lines = [b"%s %d %s\r\n" % (version, status, REASONS.get(status, b"Status"))]
    lines.append(b"Date: " + http_date() + b"\r\n")
    lines.append(b"Content-Type: " + content_type + b"\r\n")
    lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"Cache-Control: no-store\r\n")
    if content_type.startswith(b"text/html"):
        lines.append(_PAGE_SECURITY)
    for name, value in headers or ():
        lines.append(name + b": " + value + b"\r\n")
    if close:
        lines.append(b"Connection: close\r\n")
    elif version == b"HTTP/1.0":
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def error_response(
    status: int,
    *,
    node: str,
    detail: str,
    url: str | None = None,
    error_type: str | None = None,
    extra: str = "",
    close: bool = True,
    version: bytes = b"HTTP/1.1",
    head_only: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    body = pages.render_error_page(
        status=status, title=TITLES.get(status, "Error"), detail=detail, url=url, node=node
    )
    hdrs = list(headers or ())
    if error_type:
        hdrs.append((b"Proxy-Status", proxy_status_value(node, error_type, extra)))
    return simple_response(status, body, headers=hdrs, close=close, version=version, head_only=head_only)
