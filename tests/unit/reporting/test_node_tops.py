"""One node's top lists in PostgreSQL: counted hours from rollup_top_node_hour, the others from the
records, and always the same answer as counting every record."""

from __future__ import annotations

import json

import pytest

from safesquid_tw.reporting import aggregate
from safesquid_tw.reporting.pgstore import PostgresReportStore
from safesquid_tw.reporting.sqlitestore import ReportStore

H0 = 1_800_000_000 // 3600 * 3600


def rec(when: float, host: str, user: str = "alice", action: str = "allow") -> bytes:
    return json.dumps({"ts": when, "client": "10.0.0.7", "user": user, "method": "GET", "url": f"http://{host}/",
                       "status": 200, "bytes_in": 10, "bytes_out": 100, "action": action}).encode()


@pytest.fixture
def stores(postgres_server, tmp_path):
    pg = PostgresReportStore(postgres_server.new_database(), wall_clock=lambda: H0 + 4 * 3600)
    lite = ReportStore(tmp_path / "r.sqlite3", wall_clock=lambda: H0 + 4 * 3600)
    yield pg, lite
    pg.close()
    lite.close()


def ingest(stores, node, segment, records):
    for store in stores:
        store.ingest(node, segment, 0, records)


def tops(store, node):
    aggregate._NODE_TOPS.clear()
    return {d: aggregate.top(store, d, H0, H0 + 4 * 3600, node=node).entries for d in ("domain", "user", "rule")}


def filled(pg, node):
    return sorted(b for (b,) in pg.reader().execute(
        "SELECT bucket FROM rollup_top_node_filled WHERE node = ? AND bucket >= ?", (node, H0)))


def test_hours_a_node_has_left_are_counted_and_late_records_recount_them(stores):
    pg, lite = stores
    ingest(stores, "a", 1, [rec(H0 + 10 + i, f"h{i % 3}.test") for i in range(30)])
    ingest(stores, "b", 1, [rec(H0 + 20, "other.test")])
    assert filled(pg, "a") == []  # the node is still in its first hour (the day before: empty hours)
    ingest(stores, "a", 2, [rec(H0 + 3600 + i, f"h{i % 5}.test", action="deny") for i in range(20)])
    assert filled(pg, "a") == [H0]
    ingest(stores, "a", 3, [rec(H0 + 7200 + i, "late.test", user="bob") for i in range(5)])
    assert filled(pg, "a") == [H0, H0 + 3600]
    assert tops(pg, "a") == tops(lite, "a")

    # A record for a counted hour: the hour is unnamed in that commit and counted again, with it.
    ingest(stores, "a", 4, [rec(H0 + 50, "h0.test", user="carol")])
    assert filled(pg, "a") == [H0, H0 + 3600]
    assert pg.reader().execute(
        "SELECT requests FROM rollup_top_node_hour WHERE node = 'a' AND bucket = ? AND key = 'carol'", (H0,)
    ).fetchall() == [(1,)]
    assert tops(pg, "a") == tops(lite, "a")
    ingest(stores, "a", 5, [rec(H0 + 7300, "late.test")])
    assert filled(pg, "a") == [H0, H0 + 3600]
    assert tops(pg, "a") == tops(lite, "a")
    assert tops(pg, "b") == tops(lite, "b")


def test_a_restarted_master_counts_the_hours_it_missed(stores, postgres_server):
    pg, lite = stores
    ingest(stores, "a", 1, [rec(H0 + i, "x.test") for i in range(10)])
    ingest(stores, "a", 2, [rec(H0 + 3600 + i, "y.test") for i in range(10)])
    again = PostgresReportStore(pg.url, wall_clock=lambda: H0 + 4 * 3600)
    try:
        with again._write_lock:
            again._connection().execute("DELETE FROM rollup_top_node_filled")
        ingest((again, lite), "a", 3, [rec(H0 + 7200 + i, "z.test") for i in range(10)])
        assert filled(again, "a") == [H0 + 3600]  # one hour per commit, the newest first
        ingest((again, lite), "a", 4, [rec(H0 + 7300 + i, "z.test") for i in range(10)])
        assert filled(again, "a") == [H0, H0 + 3600]
        assert tops(again, "a") == tops(lite, "a")
    finally:
        again.close()


def test_retention_takes_the_counted_hours_with_the_records(stores):
    pg, lite = stores
    for hour in range(4):
        ingest(stores, "a", hour, [rec(H0 + hour * 3600 + i, f"h{hour}.test") for i in range(10)])
    assert filled(pg, "a") == [H0, H0 + 3600, H0 + 7200]
    for store in stores:
        store.prune(H0 + 7200)
    assert filled(pg, "a") == [H0 + 7200]
    assert tops(pg, "a") == tops(lite, "a")
