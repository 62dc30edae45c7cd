"""CONNECT heads seen before, parsed once.

A CONNECT head is short and its clients repeat it byte for byte (``CONNECT host:443
HTTP/1.1``, ``Host: host:443``, often a fixed User-Agent): a node opening thousands of tunnels
to the same few hosts parses the same bytes again and again. The parsed head (an immutable
`http1.RequestHead`) is a pure function of those bytes, so a head seen before is a dictionary
look-up; anything new goes through `http1.parse_request_head`, every check of which still
applies (only heads it accepted are remembered, and `split_head` has checked the line endings,
the line and head limits of the bytes before either is called).

Heads carrying credentials (``Proxy-Authorization``) are never kept: a password does not stay
in memory beyond its request because it was used for a tunnel. The table is bounded (emptied
when full) and holds heads of at most `MAX_HEAD` bytes.
"""

from __future__ import annotations

from safesquid_tw.proxy import http1

MAX_HEAD = 512
_ENTRIES = 1024
_HEADS: dict[bytes, http1.RequestHead] = {}


def is_connect(raw: bytes) -> bool:
    return raw.startswith(b"CONNECT ")


def parse_connect_head(raw: bytes, max_headers: int) -> http1.RequestHead:
    """`http1.parse_request_head(raw, max_headers)` for a CONNECT head, from memory when the
    same bytes were parsed before. Raises ProtocolError as the general parser does."""
    head = _HEADS.get(raw)
    if head is not None and len(head.headers) <= max_headers:
        return head
    head = http1.parse_request_head(raw, max_headers)
    if len(raw) <= MAX_HEAD and head.method == b"CONNECT" and not head.has(b"proxy-authorization"):
        if len(_HEADS) >= _ENTRIES:
            _HEADS.clear()
        _HEADS[raw] = head
    return head


def forget_all() -> None:
    """Empty the table (tests)."""
    _HEADS.clear()
