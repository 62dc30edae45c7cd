"""Errors (action `error`, the 502/504 answers) apart from allowed traffic, and client-aborted
transfers (`transfer` = "client_aborted"), in the store, the dashboard, the timeline, CSV and API;
an older store gains the new columns when it opens."""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import pytest
from portalkit import Portal

from safesquid_tw.accesslog.record import JSON_KEYS, AccessRecord
from safesquid_tw.reporting import aggregate
from safesquid_tw.reporting.sqlitestore import ReportStore

NOW = 1_800_000_000.0


def record(ts, **fields):
    base = {"ts": ts, "client": "10.0.0.9", "user": "alice", "method": "GET", "url": "http://site.test/",
            "status": 200, "action": "allow", "bytes_in": 10, "bytes_out": 100}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.fixture
def reports(tmp_path):
    store = ReportStore(tmp_path / "reports.sqlite3")
    store.ingest("n1", 1, 1, [
        record(NOW - 600),
        record(NOW - 590, transfer="client_aborted", bytes_out=5_000_000),
        record(NOW - 580, action="error", status=502, detail="upstream connect refused"),
        record(NOW - 570, action="error", status=504),
        record(NOW - 560, action="deny", status=403, rule="r"),
    ])
    return store


def test_totals_count_errors_and_aborted_apart(reports):
    totals = aggregate.totals(reports, NOW - 3600, NOW)
    assert (totals.requests, totals.blocked, totals.errors, totals.aborted) == (5, 1, 2, 1)
    assert totals.allowed == 2  # not the 502 and 504 answers
    bucket = [b for b in aggregate.timeline(reports, NOW - 3600, NOW, step=900) if b.totals.requests][0]
    assert bucket.totals.errors == 2 and bucket.totals.allowed == 2


def test_the_record_carries_transfer_and_old_records_read_as_complete():
    assert "transfer" in JSON_KEYS
    rec = AccessRecord(time=NOW, node="n", client="c", user=None, method="GET", url="http://a/", status=200,
                       bytes_in=1, bytes_out=2, duration_ms=1.0, action="allow", rule=None, category=None,
                       application=None, policy_version=1, transfer="client_aborted")
    line = json.loads(rec.to_json_line())
    assert line["transfer"] == "client_aborted"
    del line["transfer"]
    assert AccessRecord.from_json(line).transfer == "complete"


def test_search_filters_and_shows_transfer(reports):
    found = reports.search(start=NOW - 3600, end=NOW, transfer="client_aborted")
    assert [r["transfer"] for r in found] == ["client_aborted"]
    errors = reports.search(start=NOW - 3600, end=NOW, action="error")
    assert sorted(r["status"] for r in errors) == [502, 504]


def test_an_older_store_gains_the_columns(tmp_path):
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE rollup_minute (bucket INTEGER NOT NULL, node TEXT NOT NULL, requests INTEGER NOT NULL,
            blocked INTEGER NOT NULL, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
            PRIMARY KEY (bucket, node)) WITHOUT ROWID;
        INSERT INTO rollup_minute VALUES (1799999940, 'n1', 3, 1, 10, 20);
        CREATE TABLE rollup_hour (bucket INTEGER NOT NULL, node TEXT NOT NULL, requests INTEGER NOT NULL,
            blocked INTEGER NOT NULL, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
            PRIMARY KEY (bucket, node)) WITHOUT ROWID;
        INSERT INTO rollup_hour VALUES (1799996400, 'n1', 3, 1, 10, 20);
    """)
    conn.close()
    store = ReportStore(path)
    totals = aggregate.totals(store, NOW - 3600, NOW)
    assert (totals.requests, totals.errors, totals.aborted) == (3, 0, 0)
    store.ingest("n1", 1, 1, [record(NOW - 30, transfer="client_aborted")])
    assert aggregate.totals(store, NOW - 3600, NOW).aborted == 1


def test_dashboard_csv_and_api_show_errors_apart(tmp_path, reports):
    portal = Portal(tmp_path, reports=reports, wall_start=NOW)
    admin = portal.admin()
    page = admin.get("/reports?period=day")
    assert 'id="total-errors">2<' in page.text and 'id="total-aborted">1<' in page.text
    assert "errors" in page.text.split("Requests over time <a")[1].split("</svg>")[0]  # the chart legend
    timeline = list(csv.reader(io.StringIO(admin.get("/reports/export.csv?table=timeline&period=day").text)))
    header = timeline[0]
    busy = [row for row in timeline[1:] if row[1] != "0"][0]
    assert busy[header.index("errors")] == "2" and busy[header.index("allowed")] == "2"
    assert busy[header.index("client_aborted")] == "1"
    requests = admin.get("/reports/requests?period=day")
    assert "left</span>" in requests.text and "error-row" in requests.text
    assert "4.8 MiB" in requests.text  # sizes people read
    token = portal.api_token()
    api = portal.client().get("/api/v1/reports/dashboard?period=day", headers={"Authorization": f"Bearer {token}"})
    totals = api.json()["totals"]
    assert totals["errors"] == 2 and totals["allowed"] == 2 and totals["client_aborted"] == 1
    assert api.json()["timeline"][0].keys() >= {"errors", "client_aborted"}
