"""The `tls` key of access records in the report store: stored, filtered, and added to a store
made before the key existed."""

from __future__ import annotations

import json
import sqlite3

import pytest

from safesquid_tw.portal.reportdata import ReportQueryError, parse_search
from safesquid_tw.reporting.sqlitestore import ReportStore

T0 = 1_800_000_000.0


def rec(i: int, tls) -> bytes:
    obj = {"ts": T0 + i, "client": "10.0.0.1", "method": "GET", "url": f"https://a.example/{i}", "status": 200,
           "bytes_in": 1, "bytes_out": 2, "action": "allow"}
    if tls is not ...:
        obj["tls"] = tls
    return json.dumps(obj).encode()


def test_filter_by_tls(tmp_path):
    store = ReportStore(tmp_path / "r.sqlite3")
    store.ingest("n1", 1, 0, [rec(0, "inspected"), rec(1, "bypassed"), rec(2, None), rec(3, ...)])
    window = {"start": T0 - 1, "end": T0 + 10}
    assert [r["url"] for r in store.search(**window, tls="inspected")] == ["https://a.example/0"]
    assert [r["tls"] for r in store.search(**window, tls="bypassed")] == ["bypassed"]
    assert store.count(**window, tls="none") == 2
    assert store.count(**window) == 4


@pytest.mark.parametrize("column", ["tls", "groups"])
def test_a_store_made_before_the_key_gains_the_column_and_the_view(tmp_path, column):
    path = tmp_path / "old.sqlite3"
    ReportStore(path).close()
    conn = sqlite3.connect(path)
    # An older release's store: no such column, and no view naming it (SQLite refuses to drop a
    # column a view uses, so the view goes first).
    conn.execute("DROP VIEW access_records")
    conn.execute(f"ALTER TABLE requests DROP COLUMN {column}")
    conn.commit()
    assert column not in {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    conn.close()
    store = ReportStore(path)
    try:
        store.ingest("n1", 1, 0, [json.dumps({**json.loads(rec(0, "inspected")), "groups": ["staff"]}).encode()])
        assert store.count(start=T0 - 1, end=T0 + 1, tls="inspected") == 1
        assert store.search(start=T0 - 1, end=T0 + 1)[0]["groups"] == ["staff"]
        row = store.reader().execute("SELECT tls, groups FROM access_records").fetchone()
        assert row == ("inspected", '["staff"]')
    finally:
        store.close()


def test_the_store_opens_again_with_its_view(tmp_path):
    path = tmp_path / "r.sqlite3"
    ReportStore(path).close()
    store = ReportStore(path)  # the view is dropped and made again around the column checks
    try:
        names = [d[0] for d in store.reader().execute("SELECT * FROM access_records").description]
    finally:
        store.close()
    assert names[-4:] == ["tls", "segment", "seq", "groups"]


def test_portal_search_checks_the_tls_value():
    filters, _page = parse_search({"tls": "inspected"})
    assert filters == {"tls": "inspected"}
    with pytest.raises(ReportQueryError):
        parse_search({"tls": "decrypted"})


@pytest.mark.parametrize("groups, stored", [(["staff", "it"], ["staff", "it"]), ([], []), (None, [])])
def test_groups_are_kept(tmp_path, groups, stored):
    store = ReportStore(tmp_path / "r.sqlite3")
    try:
        obj = {**json.loads(rec(0, None)), "groups": groups}
        assert store.ingest("n1", 1, 0, [json.dumps(obj).encode()] * 1).inserted == 1
        assert store.search(start=T0 - 1, end=T0 + 1)[0]["groups"] == stored
    finally:
        store.close()


@pytest.mark.parametrize("groups", ["staff", [1], ["a", None], {"a": 1}, ["x" * 9000, "y" * 9000], ["g"] * 300])
def test_groups_that_cannot_be_stored_are_quarantined(tmp_path, groups):
    store = ReportStore(tmp_path / "r.sqlite3")
    try:
        # A valid list first, so that the remembered JSON of valid lists is exercised too.
        good = json.dumps({**json.loads(rec(0, None)), "groups": ["a", "None"]}).encode()
        bad = json.dumps({**json.loads(rec(1, None)), "groups": groups}).encode()
        result = store.ingest("n1", 1, 0, [good, bad])
        assert (result.inserted, result.quarantined) == (1, 1)
        assert "'groups'" in store.quarantined()[0]["reason"]
    finally:
        store.close()
