"""The access record's JSON line without the general encoder: byte for byte what the encoder
writes, and the encoder's own answer for every value the short way does not cover."""

from __future__ import annotations

import json
import math

import pytest

from safesquid_tw.accesslog.jsonline import json_line
from safesquid_tw.accesslog.record import JSON_KEYS, AccessRecord, _ENCODER, iso_utc_millis


def _record(**changes) -> AccessRecord:
    fields = dict(
        time=1764780000.1234567, node="node-1", client="127.0.0.1", user=None, groups=(), method="GET",
        url="http://example.com/small?q=1", status=200, bytes_in=80, bytes_out=330, duration_ms=0.8531249,
        action="allow", rule=None, category=None, application=None, policy_version=3, dlp=(), detail=None,
        transfer="complete", tls=None,
    )
    fields.update(changes)
    return AccessRecord(**fields)


def _encoder_line(r: AccessRecord) -> bytes:
    """What the general encoder writes (the code `json_line` stands in for)."""
    obj = {
        "time": iso_utc_millis(r.time), "ts": r.time, "node": r.node, "client": r.client, "user": r.user,
        "method": r.method, "url": r.url, "status": r.status, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
        "duration_ms": round(r.duration_ms, 3), "action": r.action, "rule": r.rule, "category": r.category,
        "application": r.application, "policy_version": r.policy_version, "dlp": list(r.dlp), "detail": r.detail,
        "groups": list(r.groups), "transfer": r.transfer, "tls": r.tls,
    }
    return _ENCODER.encode(obj).encode("ascii") + b"\n"


SAME = [
    _record(),
    _record(user="alice", groups=("staff", "dev"), rule="block-social", category="social", application="facebook",
            dlp=("credit-card", "iban"), detail="download size limit", transfer="client_aborted", tls="inspected"),
    _record(url="http://example.com/\u00e9t\u00e9/\"quoted\"\\back\tslash\x01\x7f", detail="caf\u00e9 \u2603 \U0001f600"),
    _record(url="http://example.com/\ud800lone-surrogate", client="::1", method="CONNECT"),
    _record(policy_version=None, status=502, action="error", detail="", user=""),
    _record(time=0.0, duration_ms=0.0, bytes_in=0, bytes_out=0),
    _record(time=1e16, duration_ms=123456789.987654, bytes_out=2**70),
    _record(dlp=["x"], groups=["a", "b"]),
]


@pytest.mark.parametrize("record", SAME)
def test_the_same_bytes_as_the_general_encoder(record):
    line = json_line(record, iso_utc_millis(record.time))
    assert line is not None
    assert line == _encoder_line(record)
    assert record.to_json_line() == line
    assert list(json.loads(line)) == list(JSON_KEYS)


OTHER_TYPES = [
    _record(status=True),  # a bool is JSON true, not 1
    _record(bytes_out=2.5),
    _record(policy_version=False),
    _record(time=1764780000),  # an int time: the encoder's own form
    _record(duration_ms=1),
    _record(user=42),
    _record(dlp="ab"),  # any iterable of strings
    _record(groups=("ok", 3)),
]


@pytest.mark.parametrize("record", OTHER_TYPES)
def test_other_types_are_left_to_the_general_encoder(record):
    assert json_line(record, iso_utc_millis(record.time)) is None
    assert record.to_json_line() == _encoder_line(record)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_duration_is_still_refused(value):
    record = _record(duration_ms=value)
    assert json_line(record, iso_utc_millis(record.time)) is None
    with pytest.raises(ValueError):
        record.to_json_line()


def test_an_int_enum_status_is_written_as_the_encoder_writes_it():
    from http import HTTPStatus

    record = _record(status=HTTPStatus.OK)
    assert json_line(record, iso_utc_millis(record.time)) is None
    assert b'"status":200,' in record.to_json_line()


def test_every_field_of_the_record_is_written_in_the_documented_order() -> None:
    """A field added to AccessRecord must reach the direct line too, not only the general encoder."""
    import attrs

    r = _record()
    assert tuple(json.loads(json_line(r, iso_utc_millis(r.time)))) == JSON_KEYS
    fields = {f.name for f in attrs.fields(AccessRecord)}
    assert fields <= set(JSON_KEYS), fields - set(JSON_KEYS)
