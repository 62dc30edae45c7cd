"""Hop-by-hop header handling for a forwarding proxy (RFC 9110 7.6), in both directions.

Headers are sequences of ``(name, value)`` byte pairs as produced by ``http1``; names keep the
case they were received with, so every comparison lower-cases first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "HOP_BY_HOP", "append_via", "client_wants_close", "connection_tokens",
    "is_valid_pseudonym", "strip_hop_by_hop", "via_contains",
    "connection_options", "names_not_forwarded",
]

Header = tuple[bytes, bytes]

# Fields that describe one connection, never the message, so a proxy must not forward them.
# Proxy-Authorization carries the client's credentials for *this* proxy and is consumed here.
# Proxy-Authenticate is in the set too, for responses: RFC 9110 11.7.1 says it "applies only to
# the next outbound client on the response chain". Since this proxy never relays the client's
# Proxy-Authorization upstream, an upstream's challenge could never be answered, and passed on
# it would look like a challenge from this proxy, letting any origin prompt users for their
# gateway credentials. A 407 of the proxy's own adds its header after stripping.
HOP_BY_HOP: frozenset[bytes] = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
_UPGRADE = frozenset({b"upgrade"})
_HOP_BY_HOP_KEEPING_UPGRADE = HOP_BY_HOP - _UPGRADE

# Fields a Connection header may not make us drop: RFC 9110 7.6.1 forbids nominating fields
# meant for every recipient, and losing these would change how the next hop reads the message.
_NEVER_NOMINATED = frozenset({b"host", b"content-length"})

_PSEUDONYM = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z:\[\]]+")


def _as_sequence(headers: Iterable[Header]) -> Sequence[Header]:
    return headers if isinstance(headers, (list, tuple)) else list(headers)


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Lower-case connection options from every Connection header field."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            for item in value.split(b","):
                token = item.strip(b" \t").lower()
                if token:
                    tokens.add(token)
    return frozenset(tokens)


def strip_hop_by_hop(
    headers: Iterable[Header], *, keep_upgrade: bool = False
) -> list[Header]:
    """Headers to forward: without hop-by-hop fields and without fields named in Connection.

    With ``keep_upgrade`` the Upgrade field survives (for a protocol switch the caller then
    forwards); adding ``Connection: upgrade`` to the outgoing message is the caller's job.
    Content-Length is left alone: keeping the framing consistent is the forwarder's job.
    """
    headers = _as_sequence(headers)
    drop = _HOP_BY_HOP_KEEPING_UPGRADE if keep_upgrade else HOP_BY_HOP
    nominated = connection_tokens(headers) - drop - _NEVER_NOMINATED
    if keep_upgrade:
        nominated -= _UPGRADE
    if nominated:
        drop = drop | nominated
    return [(name, value) for name, value in headers if name.lower() not in drop]


def client_wants_close(version: bytes, headers: Iterable[Header]) -> bool:
    """True when the connection must close after this message (RFC 9112 9.3).

    HTTP/1.1 persists unless "close" is given; HTTP/1.0 closes unless "keep-alive" is given.
    """
    tokens = connection_tokens(headers)
    if b"close" in tokens:
        return True
    if version == b"HTTP/1.1":
        return False
    return b"keep-alive" not in tokens


def is_valid_pseudonym(pseudonym: bytes) -> bool:
    """Whether ``pseudonym`` can be a Via received-by (a token, or host:port); check at config."""
    return _PSEUDONYM.fullmatch(pseudonym) is not None


def append_via(headers: Iterable[Header], version: bytes, pseudonym: bytes) -> list[Header]:
    """Headers with this hop added to Via: ``1.1 pseudonym`` (RFC 9110 7.6.3).

    ``version`` is the version of the message as received (b"HTTP/1.0" gives "1.0 ...").
    The last Via field is extended so the chain stays on one line.
    """
    protocol = version[5:] if version.startswith(b"HTTP/") else version
    entry = protocol + b" " + pseudonym
    out = list(headers)
    for i in range(len(out) - 1, -1, -1):
        name, value = out[i]
        if len(name) == 3 and name.lower() == b"via":
            out[i] = (name, value + b", " + entry if value else entry)
            return out
    out.append((b"Via", entry))
    return out


def via_contains(headers: Iterable[Header], pseudonym: bytes) -> bool:
    """Whether a Via entry was added by ``pseudonym`` already: the request is looping."""
    wanted = pseudonym.lower()
    for name, value in headers:
        if len(name) == 3 and name.lower() == b"via":
            for entry in value.split(b","):
                parts = entry.split(None, 2)
                if len(parts) >= 2 and parts[1].lower() == wanted:
                    return True
    return False


# -- the per-request forms: from the values of the Connection fields a parsed head has indexed ------


def connection_options(values: Iterable[bytes] | None) -> frozenset[bytes]:
    """Lower-case connection options from the values of a message's Connection fields
    (``head.values(b"connection")``): `connection_tokens` without walking every field."""
    if not values:
        return _NO_OPTIONS
    if type(values) is list and len(values) == 1:
        # One Connection field is the usual message ("keep-alive", "close"): its options are a
        # pure function of its value, looked up rather than split again (a bounded cache).
        value = values[0]
        found = _OPTIONS_OF.get(value)
        if found is None:
            found = _options(values)
            if len(value) <= 128:
                if len(_OPTIONS_OF) >= 256:
                    _OPTIONS_OF.clear()
                _OPTIONS_OF[value] = found
        return found
    return _options(values)


def _options(values: Iterable[bytes]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for item in value.split(b","):
            token = item.strip(b" \t").lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


_NO_OPTIONS: frozenset[bytes] = frozenset()
_OPTIONS_OF: dict[bytes, frozenset[bytes]] = {}  # one Connection value -> its options
_DROP_SETS: dict[tuple[bool, frozenset[bytes]], frozenset[bytes]] = {}
_DROP_OF: dict[tuple[tuple[bool, frozenset[bytes]], bytes], frozenset[bytes]] = {}  # ... and one Connection value


def names_not_forwarded(
    connection_values: Iterable[bytes] | None, *, keep_upgrade: bool = False,
    also: frozenset[bytes] = _NO_OPTIONS,
) -> frozenset[bytes]:
    """Lower-case names of the fields `strip_hop_by_hop` would drop from a message whose
    Connection fields carry `connection_values`, plus `also` (the caller's own, e.g. the
    framing fields it sets itself). One set lookup per field then filters a head in one pass;
    the usual message (no Connection field, or only keep-alive / close) costs no set building."""
    key = (keep_upgrade, also)
    base = _DROP_SETS.get(key)
    if base is None:
        base = _DROP_SETS[key] = (_HOP_BY_HOP_KEEPING_UPGRADE if keep_upgrade else HOP_BY_HOP) | also
    if not connection_values:
        return base
    single = type(connection_values) is list and len(connection_values) == 1
    if single:  # the usual Connection field ("keep-alive"): the set once per value (bounded)
        found = _DROP_OF.get((key, connection_values[0]))
        if found is not None:
            return found
    nominated = connection_options(connection_values) - base - _NEVER_NOMINATED
    if keep_upgrade:
        nominated -= _UPGRADE
    drop = base | nominated if nominated else base
    if single and len(connection_values[0]) <= 128:
        if len(_DROP_OF) >= 256:
            _DROP_OF.clear()
        _DROP_OF[(key, connection_values[0])] = drop
    return drop
