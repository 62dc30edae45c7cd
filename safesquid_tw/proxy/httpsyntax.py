"""HTTP/1.1 syntax shared by the head parser (``http1``) and the chunked decoder (``chunked``).

Pure (no Twisted). It holds the error both layers raise and the field-line grammar, which
trailer fields share with header fields (RFC 9112 7.1.2), so that both read fields identically.
"""

from __future__ import annotations

import re

__all__ = ["FIELD_LINE", "TCHAR", "TOKEN", "ProtocolError", "diagnose_field_line"]


class ProtocolError(Exception):
    """A message that must be refused: ``status`` is the answer to send (502 for a bad response)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.status} {self.detail}"


# RFC 9110 5.6.2 tchar.
TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
TOKEN = re.compile(rb"[" + TCHAR + rb"]+")
# A field line: token ":" OWS value. The value may hold HTAB, SP, VCHAR and obs-text, nothing
# else; trailing OWS is stripped afterwards (a lazy group here would backtrack on every byte).
FIELD_LINE = re.compile(rb"([" + TCHAR + rb"]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)")


def diagnose_field_line(line: bytes) -> str:
    """Why ``FIELD_LINE`` refused ``line``, as a detail for the ProtocolError."""
    # Cold path: only runs for a line the fast regex refused, to give a useful reason.
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding"
    name, colon, value = line.partition(b":")
    if not colon:
        return "header line without a colon"
    if not name:
        return "empty header name"
    if name.rstrip(b" \t") != name:
        return "whitespace between header name and colon"
    if not TOKEN.fullmatch(name):
        return "invalid character in header name"
    for byte in (b"\r", b"\n", b"\x00"):
        if byte in value:
            return f"{byte!r} in header value"
    return "invalid character in header value"
