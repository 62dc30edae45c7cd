"""Records out of range at ingest: each is set aside alone (quarantine table and quarantine.jsonl)
and counted; the rest of its batch is stored; the report queries keep answering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from safesquid_tw.reporting.recordcheck import MAX_BYTES, QuarantineFile, check_record, quarantining
from safesquid_tw.reporting.rows import MalformedRecord
from safesquid_tw.reporting.sqlitestore import IngestResult, ReportStore

T0 = 1_795_300_000.0


def rec(i: int = 0, **fields: Any) -> bytes:
    base: dict[str, Any] = {"ts": T0 + i, "client": "10.0.0.1", "user": "alice", "method": "GET",
                            "url": f"http://example.test/{i}", "status": 200, "bytes_in": 10,
                            "bytes_out": 100, "duration_ms": 1.5, "action": "allow"}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"bytes_out": 2**62}, "'bytes_out' out of range"),
        ({"bytes_in": 2**64}, "'bytes_in' out of range"),
        ({"status": 10**6}, "'status'"),
        ({"duration_ms": -5}, "negative"),
        ({"ts": 1e300}, "'ts'"),
        ({"policy_version": 2**70}, "'policy_version'"),
        ({"user": "u" * 5000}, "'user' is 5000 characters"),
        ({"url": "http://x/" + "a" * 70000}, "'url'"),
        ({"dlp": ["x"] * 500}, "'dlp'"),
    ],
)
def test_out_of_range_values_are_refused_by_name(fields, reason):
    with pytest.raises(MalformedRecord, match=reason):
        check_record(json.loads(rec(**fields)))


def test_a_plausible_record_passes():
    obj = json.loads(rec(bytes_out=MAX_BYTES))
    assert check_record(obj) is obj


def test_a_bad_record_is_quarantined_alone_and_the_batch_is_stored(tmp_path: Path):
    store = ReportStore(tmp_path / "reports.sqlite3", wall_clock=lambda: T0 + 100)
    quarantine = QuarantineFile(tmp_path / "quarantine.jsonl")
    ingest = quarantining(store.ingest, store, quarantine)
    batch = [rec(0), rec(1, bytes_out=2**62), rec(2), rec(3, user=["not", "text"]), rec(4)]
    assert ingest("n1", 7, 0, batch) == IngestResult(3, 0, 2)
    assert quarantine.count == 2
    lines = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert [(e["node"], e["segment"], e["seq"]) for e in lines] == [("n1", 7, 1), ("n1", 7, 3)]
    assert "out of range" in lines[0]["reason"] and json.loads(lines[0]["raw"])["bytes_out"] == 2**62
    assert (tmp_path / "quarantine.jsonl").stat().st_mode & 0o777 == 0o600
    # Re-shipping the batch stores nothing twice and quarantines nothing twice.
    assert ingest("n1", 7, 0, batch) == IngestResult(0, 5, 0)
    assert quarantine.count == 2
    assert store.count() == 3
    # The report queries sum what was stored without overflowing.
    assert len(store.search(start=T0 - 60, end=T0 + 60, limit=10)) == 3
    store.close()


def test_report_pages_answer_with_extreme_but_accepted_values_and_hostile_ones_set_aside(tmp_path: Path):
    from portalkit import Portal

    now = T0 + 600
    store = ReportStore(tmp_path / "reports.sqlite3")
    # Many transfers at the largest accepted size in one minute and hour, and values that would
    # overflow the roll-ups or bloat every page: the former stored, the latter set aside.
    big = [rec(i, bytes_in=MAX_BYTES, bytes_out=MAX_BYTES, duration_ms=1e9) for i in range(400)]
    hostile = [rec(0, bytes_out=2**62), rec(0, bytes_in=2**63), rec(0, status=2**40), rec(0, ts=1e300),
               rec(0, user="x" * 100_000), rec(0, duration_ms=float("1e308"))]
    result = store.ingest("n1", 1, 0, big + hostile)
    assert result == IngestResult(400, 0, len(hostile))
    portal = Portal(tmp_path, reports=store, wall_start=now)
    admin = portal.admin()
    for path in ("/reports", "/reports?period=day", "/reports/requests?period=day", "/reports/export.csv?table=requests&period=day"):
        page = admin.get(path)
        assert page.code == 200, (path, page.code)
    store.close()
