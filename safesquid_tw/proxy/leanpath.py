"""The lean path: the common request relayed in fewer steps than the general one.

Most requests a forward proxy sees are keep-alive GETs or HEADs with no body, no Upgrade, no
Expect, no Max-Forwards, no Via and no forwarding chain of their own, answered by an origin with a
length-delimited (or empty) body that arrives whole in one read. For those the general path
builds header lists it filters again, checks for features the request cannot use, and registers
the origin connection as a producer for back-pressure on a body that is already in memory.

The lean path takes over only after everything that guards the proxy ran unchanged on the
request: the strict parser, the Host rule, the framing rules, the policy decision, the content
checks, the URL normalisation (all in `frontdoor`). It then builds the upstream head in one pass
(`request_head`) and, for the response, the client's head in one pass (`response_head`); both
produce exactly the bytes the general path produces (tests/unit/proxy/test_leanpath.py compares
them), and return None for anything they do not cover, which then takes the general path.
The access record is written exactly as on the general path (ProxyFactory.record), before the
response leaves (ClientConnection.send_output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safesquid_tw.proxy import http1
from safesquid_tw.proxy.headers import names_not_forwarded
from safesquid_tw.proxy.target import host_header_for

if TYPE_CHECKING:
    from safesquid_tw.proxy.context import RequestContext
    from safesquid_tw.proxy.forward import Exchange
    from safesquid_tw.proxy.frontdoor import ClientConnection

LEAN_METHODS = frozenset({b"GET", b"HEAD"})
# Request fields only the general path handles: bodies, protocol upgrades, expectations,
# Max-Forwards, a Via chain (loop check and extension), a forwarding chain to rewrite.
GENERAL_ONLY_REQUEST_FIELDS = frozenset({
    b"content-length", b"transfer-encoding", b"upgrade", b"expect", b"max-forwards", b"via",
    b"x-forwarded-for", b"forwarded",
})
SET_BY_US = frozenset({b"host", b"content-length", b"max-forwards", b"expect"})  # as frontdoor's
_CONTENT_LENGTH = frozenset({b"content-length"})
_NOTHING: frozenset[bytes] = frozenset()
_VIA_LINES: dict[tuple[bytes, bytes], bytes] = {}
# Heads built recently, by the identity of their parsed field lines. `http1` shares one tuple of
# forwarded lines among the heads of the same field block (its block cache), so a repeated block
# finds its head here. An entry holds that tuple (its id cannot be reused while the entry lives)
# and every other input of the head, each compared on a hit: the head is a pure function of them
# (the field block fixes the fields, their Connection options and any Via; the target object fixes
# path and Host). Only heads that passed `_checked` are kept; the memo is emptied when full.
_REQUEST_MEMO: dict[int, tuple] = {}
_RESPONSE_MEMO: dict[int, tuple] = {}
_MEMO_SIZE = 256


def via_line(version: bytes, pseudonym: bytes) -> bytes:
    """``Via: 1.1 pseudonym`` and its CRLF for a message received as `version` (as `append_via`)."""
    key = (version, pseudonym)
    line = _VIA_LINES.get(key)
    if line is None:
        protocol = version[5:] if version.startswith(b"HTTP/") else version
        line = _VIA_LINES[key] = b"Via: " + protocol + b" " + pseudonym + b"\r\n"
    return line


def request_head(conn: "ClientConnection", ctx: "RequestContext") -> bytes | None:
    """The head `ClientConnection._forward` would send upstream for this request, or None when
    the request is not a common one (the general path then builds it)."""
    head = ctx.head
    if head.method not in LEAN_METHODS or ctx.framing.kind != "none":
        return None
    index = head._index
    if not GENERAL_ONLY_REQUEST_FIELDS.isdisjoint(index):
        return None
    mode = ctx.policy.compiled.forwarding.mode
    if mode == "append":
        forwarded_for = conn.peer_ip.encode("ascii", "replace")
    elif mode == "replace":
        forwarded_for = conn.client_ip.encode("ascii", "replace")
    elif mode in ("transparent", "delete"):
        forwarded_for = None
    else:
        return None
    target = ctx.target
    forwarded = head.lines
    pseudonym = conn.factory.pseudonym
    if forwarded is not None:
        # The same client sends the same field block for the same target again and again: the
        # head built last time for exactly these inputs is reused (see _REQUEST_MEMO).
        entry = _REQUEST_MEMO.get(id(forwarded))
        if (
            entry is not None and entry[0] is forwarded and entry[1] is target and entry[2] == head.method
            and entry[3] == forwarded_for and entry[4] == head.version and entry[5] == pseudonym
        ):
            return entry[6]
    drop = names_not_forwarded(index.get(b"connection"), also=SET_BY_US)
    parts = [head.method, b" ", target.path.encode("ascii", "replace") or b"/", b" HTTP/1.1\r\nHost: ",
             host_header_for(target), b"\r\n"]
    lines = 4  # request line, Host, Via, the empty line
    if forwarded is not None:  # each field's line as forwarded, made once per distinct line (http1)
        for lname, line in forwarded:
            # Field names with "_" are dropped as on the general path (CGI-style origins would
            # read X_Forwarded_For as the X-Forwarded-For the proxy vouches for).
            if lname in drop or b"_" in lname:
                continue
            parts.append(line)
            lines += 1
    else:
        for name, value in head.headers:
            if name.lower() in drop or b"_" in name:
                continue
            parts += (name, b": ", value, b"\r\n")
            lines += 1
    if forwarded_for is not None:
        parts += (b"X-Forwarded-For: ", forwarded_for, b"\r\n")
        lines += 1
    parts.append(via_line(head.version, pseudonym))
    parts.append(b"\r\n")
    data = _checked(parts, lines)
    if forwarded is not None:
        _remember(_REQUEST_MEMO, forwarded, (forwarded, target, head.method, forwarded_for, head.version, pseudonym, data))
    return data


def response_head(exchange: "Exchange", head: http1.ResponseHead, framing: http1.Framing) -> bytes | None:
    """The head `Exchange.upstream_head` would write to an HTTP/1.1 client for a response with
    a length-delimited or no body and no Via of its own, or None (the general path builds it).
    Sets the exchange's `_response_close` as the general path does."""
    ctx = exchange.ctx
    kind = framing.kind
    if ctx.version != b"HTTP/1.1" or (kind != "length" and kind != "none"):
        return None
    client_close = ctx.client_close or not exchange._body_done
    forwarded = head.lines
    pseudonym = exchange.conn.factory.pseudonym
    length = framing.length if kind == "length" else None
    if forwarded is not None:
        # An origin answers with the same field block (all but its Date's second) again and
        # again: the head built last time for exactly these inputs is reused (see _RESPONSE_MEMO).
        entry = _RESPONSE_MEMO.get(id(forwarded))
        if (
            entry is not None and entry[0] is forwarded and entry[1] == head.status and entry[2] == head.reason
            and entry[3] == length and entry[4] == client_close and entry[5] == head.version
            and entry[6] == pseudonym
        ):
            exchange._response_close = client_close
            return entry[7]
    if head.has(b"via"):
        return None
    drop = names_not_forwarded(head.values(b"connection"), also=_CONTENT_LENGTH if kind != "none" else _NOTHING)
    parts = [b"HTTP/1.1 %d " % head.status, head.reason, b"\r\n"]
    lines = 3  # status line, Via, the empty line
    if forwarded is not None:
        for lname, line in forwarded:
            if lname not in drop:
                parts.append(line)
                lines += 1
    else:
        for name, value in head.headers:
            if name.lower() not in drop:
                parts += (name, b": ", value, b"\r\n")
                lines += 1
    parts.append(via_line(head.version, pseudonym))
    if kind == "length":
        parts.append(b"Content-Length: %d\r\n" % length)
        lines += 1
    if client_close:
        parts.append(b"Connection: close\r\n")
        lines += 1
    parts.append(b"\r\n")
    data = _checked(parts, lines)
    exchange._response_close = client_close
    if forwarded is not None:
        _remember(_RESPONSE_MEMO, forwarded,
                  (forwarded, head.status, head.reason, length, client_close, head.version, pseudonym, data))
    return data


def _remember(memo: dict[int, tuple], forwarded: tuple, entry: tuple) -> None:
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[id(forwarded)] = entry


def _checked(parts: list[bytes], lines: int) -> bytes:
    """Join a head of `lines` lines; the same guard as `http1` against CR, LF or NUL inside
    a field (exactly one CRLF per line, no other CR, LF or NUL)."""
    data = b"".join(parts)
    if data.count(b"\n") != lines or data.count(b"\r") != lines or b"\x00" in data:
        raise ValueError("CR, LF or NUL inside a head field would break message framing")
    return data
