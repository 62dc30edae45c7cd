"""The canonical bytes of a big document, made in small pieces.

`json.dumps` of a 100,000-domain policy is one C call of about 20 ms that holds the GIL
throughout: while a worker thread serialises, the reactor thread cannot run at all. These
functions give byte for byte what `codec.canonical_bytes` gives, but serialise objects key by key
and long lists a slice at a time, so the GIL changes hands between the pieces. They also make a
cache or history record around document bytes already made, instead of serialising the
document again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from safesquid_tw.policy.codec import DIGEST_PREFIX

_LIST_SLICE = 500  # items serialised per json.dumps call


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def canonical_bytes_in_pieces(value: Any) -> bytes:
    """Equal to `codec.canonical_bytes(value)`, made in pieces of bounded size."""
    if isinstance(value, dict):
        if not value:
            return b"{}"
        parts = []
        for key in sorted(value):
            if not isinstance(key, str):  # json.dumps would convert; keep its exact behaviour
                return _dumps(value)
            parts.append(_dumps(key) + b":" + canonical_bytes_in_pieces(value[key]))
        return b"{" + b",".join(parts) + b"}"
    if isinstance(value, list) and len(value) > _LIST_SLICE:
        parts = [_dumps(value[i:i + _LIST_SLICE])[1:-1] for i in range(0, len(value), _LIST_SLICE)]
        return b"[" + b",".join(parts) + b"]"
    return _dumps(value)


def canonical_parts_reusing(document: dict[str, Any],
                            kept: dict[str, tuple[Any, bytes]]) -> tuple[list[bytes], dict[str, tuple[Any, bytes]]]:
    """Pieces whose concatenation is `canonical_bytes_in_pieces(document)`, with the bytes of each
    top-level section that is the very object it was when `kept` was made taken from `kept` (a
    section reused from the previous version is not serialised again). The big pieces are never
    copied into a new object here: making a 3 MB bytes object holds the GIL for milliseconds (its
    fresh pages are faulted in under it). Returns the pieces and the `kept` for next time."""
    if not document or not all(isinstance(key, str) for key in document):
        return [canonical_bytes_in_pieces(document)], {}
    parts = [b"{"]
    now: dict[str, tuple[Any, bytes]] = {}
    for key in sorted(document):
        value = document[key]
        found = kept.get(key)
        data = found[1] if found is not None and found[0] is value else canonical_bytes_in_pieces(value)
        now[key] = (value, data)
        if len(parts) > 1:
            parts.append(b",")
        parts += [_dumps(key), b":", data]
    parts.append(b"}")
    return parts, now


def digest_of_parts(parts: list[bytes]) -> str:
    """`digest_of_bytes(b"".join(parts))` without joining them."""
    hashed = hashlib.sha256()
    for part in parts:
        hashed.update(part)
    return DIGEST_PREFIX + hashed.hexdigest()


def parts_equal(parts: list[bytes], data: bytes) -> bool:
    """Whether `b"".join(parts) == data`, compared piece by piece (no joined copy)."""
    if sum(map(len, parts)) != len(data):
        return False
    view = memoryview(data)
    offset = 0
    for part in parts:
        if view[offset:offset + len(part)] != part:
            return False
        offset += len(part)
    return True


def digest_of_bytes(data: bytes) -> str:
    """The policy digest of a document whose canonical bytes are `data` (hashlib releases the
    GIL for large inputs)."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def record_parts(fields: dict[str, Any], key: str, document_bytes: bytes | list[bytes]) -> list[bytes]:
    """`record_bytes(...)` as pieces, the document's bytes (or their pieces) among them (written,
    never copied)."""
    parts: list[bytes] = [b"{"]
    for name in sorted([*fields, key]):
        head = (b"," if len(parts) > 1 else b"") + _dumps(name) + b":"
        if name == key:
            parts += [head, *document_bytes] if isinstance(document_bytes, list) else [head, document_bytes]
        else:
            parts.append(head + _dumps(fields[name]))
    parts.append(b"}")
    return parts


def record_bytes(fields: dict[str, Any], key: str, document_bytes: bytes) -> bytes:
    """`canonical_bytes(dict(fields, **{key: document}))` from the document's canonical bytes."""
    parts = []
    for name in sorted([*fields, key]):
        value = document_bytes if name == key else _dumps(fields[name])
        parts.append(_dumps(name) + b":" + value)
    return b"{" + b",".join(parts) + b"}"


__all__ = [
    "canonical_bytes_in_pieces",
    "canonical_parts_reusing",
    "digest_of_parts",
    "parts_equal",
    "record_parts",
    "digest_of_bytes",
    "record_bytes",
]
