"""The directly written JSON line (accesslog/jsonline.py) is byte for byte the general encoder's."""

from __future__ import annotations

import json

import attrs
import pytest

from safesquid_tw.accesslog import jsonline
from safesquid_tw.accesslog.record import _ENCODER, AccessRecord, iso_utc_millis


def general_line(record: AccessRecord) -> bytes:
    obj = {
        "time": iso_utc_millis(record.time), "ts": record.time, "node": record.node, "client": record.client,
        "user": record.user, "method": record.method, "url": record.url, "status": record.status,
        "bytes_in": record.bytes_in, "bytes_out": record.bytes_out, "duration_ms": round(record.duration_ms, 3),
        "action": record.action, "rule": record.rule, "category": record.category,
        "application": record.application, "policy_version": record.policy_version, "dlp": list(record.dlp),
        "detail": record.detail, "groups": list(record.groups), "transfer": record.transfer, "tls": record.tls,
    }
    return _ENCODER.encode(obj).encode("ascii") + b"\n"


def record(**changes) -> AccessRecord:
    base = AccessRecord(
        time=1764800000.123456, node="node-1", client="127.0.0.1", user=None, method="CONNECT",
        url="example.com:443", status=200, bytes_in=120, bytes_out=4567, duration_ms=1.2345678,
        action="allow", rule=None, category=None, application=None, policy_version=3,
    )
    return attrs.evolve(base, **changes)


@pytest.mark.parametrize("changes", [
    {},
    {"user": "alice", "groups": ("staff", "dev"), "rule": "r-1", "category": "news", "application": "Teams"},
    {"url": "http://example.com/caf\u00e9?q=\"quoted\"\\back\nline\t\x01", "detail": "\u2603 snow \ud800"},
    {"dlp": ("card-number", "iban"), "detail": "blocked: \"x\"", "transfer": "client_aborted", "tls": "inspected"},
    {"policy_version": None, "duration_ms": 0.0, "time": 0.5, "bytes_in": 0, "bytes_out": 1 << 40},
    {"duration_ms": 1e-9, "time": 1764800000.0},
    {"duration_ms": 123456789.987654321},
    {"method": "GET", "status": 504, "action": "error", "detail": "connecting to 10.0.0.1:443 took longer than 10 s"},
])
def test_the_same_bytes_as_the_general_encoder(changes) -> None:
    r = record(**changes)
    line = jsonline.encode(r, iso_utc_millis(r.time))
    assert line == general_line(r)
    assert r.to_json_line() == line
    assert list(json.loads(line)) == list(json.loads(general_line(r)))


@pytest.mark.parametrize("changes", [
    {"status": True},  # a bool is not an int to the encoder
    {"bytes_in": 1.0},
    {"policy_version": "3"},
    {"time": 1764800000},  # an int time: the encoder writes it as such
    {"user": b"alice"},
    {"groups": ("staff", 3)},
])
def test_unusual_values_go_to_the_general_encoder(changes) -> None:
    r = record(**changes)
    assert jsonline.encode(r, "2025-12-03T22:13:20.123Z") is None


@pytest.mark.parametrize("changes", [{"duration_ms": float("nan")}, {"time": float("inf")}])
def test_a_value_json_cannot_carry_still_fails_as_before(changes) -> None:
    r = record(**changes)
    assert jsonline.encode(r, "x") is None
    with pytest.raises((ValueError, OverflowError)):
        r.to_json_line()


def test_bytes_in_a_text_field_still_fails_as_before() -> None:
    with pytest.raises(TypeError):
        record(user=b"alice").to_json_line()


def test_every_field_of_the_record_is_written_in_the_documented_order() -> None:
    """A field added to AccessRecord must reach the direct line too, not only the general encoder."""
    from safesquid_tw.accesslog.record import JSON_KEYS

    line = jsonline.encode(record(), iso_utc_millis(record().time))
    assert tuple(json.loads(line)) == JSON_KEYS
    fields = {f.name for f in attrs.fields(AccessRecord)}
    assert fields <= set(JSON_KEYS), fields - set(JSON_KEYS)
