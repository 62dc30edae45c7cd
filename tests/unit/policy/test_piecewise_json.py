"""Decoding a document a member at a time gives exactly what decoding it whole gives, errors too."""

from __future__ import annotations

import json

import pytest

from safesquid_tw.policy.codec import canonical_bytes, parse_json
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.piecewise_json import parse_json_in_pieces

DOC = {"format": "safesquid-policy/1", "comment": "é ü \u2603",
       "categories": {"b": {"domains": ["x.test", "y.test"]}, "a": {"domains": [], "description": "d"}},
       "access": {"default_action": "allow", "rules": [{"name": "r", "action": "deny", "enabled": True,
                                                        "ports": [1, 2.5, None]}]},
       "nested": {"x": {"y": {"z": {"w": [{}]}}}}, "empty": {}}


@pytest.mark.parametrize("data", [
    canonical_bytes(DOC),
    json.dumps(DOC, indent=2).encode(),
    b"\xef\xbb\xbf" + json.dumps(DOC).encode(),  # a byte order mark
    b"  \n" + json.dumps(DOC, separators=(" , ", " : ")).encode() + b"\n ",
    b"[1, 2]", b'"text"', b"{}",
])
@pytest.mark.parametrize("depth", [0, 1, 3, 6])
def test_the_same_value_with_keys_in_the_same_order(data, depth):
    got = parse_json_in_pieces(data, depth)
    assert got == parse_json(data)
    assert json.dumps(got) == json.dumps(parse_json(data))


@pytest.mark.parametrize("data", [
    b'{"a": 1, "a": 2}', b'{"a": {"b": 1, "b": 2}}', b'{"a": {"b": {"c": 1, "c": 1}}}',
    b'{"a": NaN}', b'{"a": 1,}', b'{"a": 1} x', b'{"a" 1}', b'{1: 2}', b"\xff\xfe", b"{", b"",
    b'{"a": [1, 2}',
])
def test_errors_are_parse_jsons(data):
    with pytest.raises(PolicyError) as whole:
        parse_json(data)
    with pytest.raises(PolicyError) as pieces:
        parse_json_in_pieces(data, 3)
    assert str(pieces.value) == str(whole.value)


@pytest.mark.parametrize("data", [
    json.dumps({"document": DOC, "comment": "c"}).encode(),
    b'{"a": 1, "a": {"b": 2}}',  # json keeps the last of repeated keys
    b'{"a": NaN, "b": [Infinity]}',
    "{\"\u00e9\": 1}".encode("utf-16"),
])
def test_loads_in_pieces_is_json_loads(data):
    from safesquid_tw.policy.piecewise_json import loads_in_pieces

    assert repr(loads_in_pieces(data, 4)) == repr(json.loads(data))


@pytest.mark.parametrize("data", [b'{"a": 1,}', b"\xff", b"[1, 2", b'{"a": {"b": }}'])
def test_loads_in_pieces_fails_as_json_loads_does(data):
    from safesquid_tw.policy.piecewise_json import loads_in_pieces

    with pytest.raises(ValueError) as whole:
        json.loads(data)
    with pytest.raises(ValueError) as pieces:
        loads_in_pieces(data, 4)
    assert str(pieces.value) == str(whole.value)
