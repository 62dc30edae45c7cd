"""The fast decoder of shipped records gives the generic path's row, or leaves the record to it."""

from __future__ import annotations

import json

import pytest

from safesquid_tw.reporting import fastrows
from safesquid_tw.reporting.recordcheck import check_record
from safesquid_tw.reporting.rows import MalformedRecord, record_row

BASE = {
    "time": "2026-12-03T10:00:00.250Z", "ts": 1796292000.25, "node": "slave1", "client": "10.0.0.1",
    "user": "alice", "method": "GET", "url": "http://WWW.Example.test./a?b=1", "status": 200,
    "bytes_in": 120, "bytes_out": 3400, "duration_ms": 12.5, "action": "allow", "rule": "r1",
    "category": "news", "application": None, "policy_version": 7, "dlp": [], "detail": None,
    "groups": ["staff", "sales"], "transfer": "complete", "tls": None,
}  # fmt: skip


def generic(raw: bytes):
    try:
        return record_row(check_record(json.loads(raw)))
    except (MalformedRecord, ValueError):
        return "refused"


def line(**changes) -> bytes:
    record = {**BASE, **changes}
    for key, value in changes.items():
        if value is _ABSENT:
            del record[key]
    return json.dumps(record).encode()


_ABSENT = object()

# Records the fast decoder takes: its row must be the generic one.
TAKEN = [
    line(),
    line(url="example.test:443", method="CONNECT", tls="inspected"),
    line(url="http://[::1]:8080/x", user=None, groups=[]),
    line(url="/relative", status=None, bytes_in=None, duration_ms=None),
    line(dlp=["card", "iban"], detail="matched", policy_version="v7"),
    line(transfer="", action="deny"),
    line(ts=1796292000, time=_ABSENT),
    line(url="http://ex.test?q=/x"),
    line(url="http://ex.test#frag/x"),
    line(user="é" * 1024),
    line(url="http://a.test/" + "x" * 60000),
    b'{"ts": 1796292000.0, "ts": 1796292001.5, "user": "a", "user": "b"}',  # the last one counts, as in json
]
# Records it leaves to the generic path (stored or refused there, as before).
LEFT = [
    line(extra="field"),  # an unknown key: the generic length check applies to it
    line(status=200.0),  # an integral float: stored as 200 by the generic path
    line(ts=_ABSENT),  # time from the ISO text
    line(ts=None),
    line(detail={"a": [1, 2]}),  # detail as JSON of an object
    line(bytes_out=1 << 45),  # out of range: refused
    line(user="u" * 1025),  # too long: refused
    line(groups=["g" * 100] * 200),  # too long in all: refused
    line(dlp=["x" * 200] * 100),  # too long as JSON: refused
    line(status=True),
    b'{"ts": NaN}',
    b"not json",
    b"[1, 2]",
    b'{"ts": 1796292000.25, "ts": "x"}',
]


@pytest.mark.parametrize("raw", TAKEN)
def test_records_of_the_usual_shape_get_the_generic_row(raw):
    (row,) = fastrows.decode([raw])
    assert row is not None
    assert row == generic(raw)


@pytest.mark.parametrize("raw", LEFT)
def test_other_records_are_left_to_the_generic_path(raw):
    (row,) = fastrows.decode([raw])
    assert row is None or row == generic(raw)


def test_a_batch_keeps_its_order_with_a_bad_record_inside():
    rows = fastrows.decode([line(user="a"), b"not json", line(user="b")])
    assert [row and row[3] for row in rows] == ["a", None, "b"]


def test_hosts_are_told_apart_when_the_authority_has_no_slash():
    rows = fastrows.decode([line(url="http://a.test?x"), line(url="http://a.test?x/y"), line(url="http://b.test")])
    assert [row[6] for row in rows] == ["a.test", "a.test", "b.test"]
