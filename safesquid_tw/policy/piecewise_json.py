"""JSON text decoded an object member at a time, so a big policy never holds the GIL in one call.

`json.loads` of a 3 MB policy (100,000 domains) is one C call of 10 ms and more on a loaded core,
holding the GIL throughout: whatever else the process does (its reactor thread, serving requests)
waits that long. Here the outer objects (the document, its sections, each category) are walked in
Python and each member's value below `depth` is decoded by one `raw_decode` call, so the GIL can
change hands between members. The result is exactly `codec.parse_json`'s; so are its errors (a
text this walk does not take is handed to `parse_json` whole, which says what is wrong).
"""

from __future__ import annotations

import json
from json.decoder import WHITESPACE
from typing import Any

from safesquid_tw.policy.codec import _refuse_constant, _refuse_duplicate_keys, parse_json
from safesquid_tw.policy.errors import PolicyError

_DECODER = json.JSONDecoder(object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant)
_PLAIN = json.JSONDecoder()


class _NotTaken(Exception):
    """Something to let `parse_json` report."""


def parse_json_in_pieces(data: bytes, depth: int = 3) -> object:
    """`codec.parse_json(data)`, with objects down to `depth` levels decoded member by member."""
    try:
        text = data.decode("utf-8-sig")
        value, end = _value(text, _skip(text, 0), depth)
        if _skip(text, end) != len(text):
            raise _NotTaken()
        return value
    except (_NotTaken, ValueError, IndexError, RecursionError, PolicyError, UnicodeDecodeError):
        return parse_json(data)  # its message, with the line and column


def loads_in_pieces(data: bytes, depth: int = 3) -> Any:
    """`json.loads(data)` (repeated keys: the last wins; errors: json's), with objects down to
    `depth` levels decoded member by member. For request bodies that are not yet a policy."""
    try:
        text = data.decode("utf-8")
        value, end = _value(text, _skip(text, 0), depth, _PLAIN)
        if _skip(text, end) != len(text):
            raise _NotTaken()
        return value
    except (_NotTaken, ValueError, IndexError, RecursionError, UnicodeDecodeError):
        return json.loads(data)  # what json says, or its exact value where this walk gave up


def _skip(text: str, index: int) -> int:
    return WHITESPACE.match(text, index).end()


def _value(text: str, index: int, depth: int, decoder: json.JSONDecoder = _DECODER) -> tuple[Any, int]:
    if depth > 0 and text.startswith("{", index):
        return _object(text, index + 1, depth - 1, decoder)
    return decoder.raw_decode(text, index)


def _object(text: str, index: int, depth: int, decoder: json.JSONDecoder) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    index = _skip(text, index)
    if text.startswith("}", index):
        return out, index + 1
    while True:
        if not text.startswith('"', index):
            raise _NotTaken()
        key, index = decoder.raw_decode(text, index)
        index = _skip(text, index)
        if not text.startswith(":", index):
            raise _NotTaken()
        value, index = _value(text, _skip(text, index + 1), depth, decoder)
        if key in out:
            raise _NotTaken()  # parse_json names the repeated key (json.loads keeps the last)
        out[key] = value
        index = _skip(text, index)
        if text.startswith(",", index):
            index = _skip(text, index + 1)
            continue
        if text.startswith("}", index):
            return out, index + 1
        raise _NotTaken()


__all__ = ["loads_in_pieces", "parse_json_in_pieces"]
