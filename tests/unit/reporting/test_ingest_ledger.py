"""Exactly once without a unique key per record: the PostgreSQL store keeps the runs of names it
stored (its ledger); re-shipments in any order and overlap are counted once, in both stores, and
the roll-ups count each record once. Also: top lists of one node, read from the records in
PostgreSQL, agree with the SQLite store's per-node roll-up."""

import json
import threading

import pytest

from safesquid_tw.reporting import aggregate
from safesquid_tw.reporting.sqlitestore import IngestResult, ReportStore

T0 = 1_800_000_000.0


def rec(i: int, host: str = "a.test", user: str = "u1", action: str = "allow") -> bytes:
    return json.dumps({"ts": T0 + i * 7, "client": "10.0.0.1", "user": user, "method": "GET",
                       "url": f"http://{host}/{i}", "status": 200, "bytes_in": 1, "bytes_out": 2,
                       "action": action}).encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = ReportStore(tmp_path / "reports.sqlite3", wall_clock=lambda: T0)
    else:
        from safesquid_tw.reporting.pgstore import PostgresReportStore

        s = PostgresReportStore(request.getfixturevalue("postgres_server").new_database(), wall_clock=lambda: T0)
    yield s
    s.close()


def total_requests(store) -> int:
    return store.reader().execute("SELECT coalesce(sum(requests), 0) FROM rollup_minute").fetchone()[0]


def test_overlapping_and_out_of_order_shipments_store_each_record_once(store):
    records = [rec(i) for i in range(100)]
    assert store.ingest("n1", 1, 50, records[50:80]) == IngestResult(30, 0, 0)
    assert store.ingest("n1", 1, 0, records[0:20]) == IngestResult(20, 0, 0)
    # Overlaps both stored runs and the gaps between and after them.
    assert store.ingest("n1", 1, 10, records[10:90]) == IngestResult(40, 40, 0)
    assert store.ingest("n1", 1, 0, records) == IngestResult(10, 90, 0)
    assert store.ingest("n1", 1, 0, records) == IngestResult(0, 100, 0)
    assert store.count() == 100
    assert total_requests(store) == 100
    top = aggregate.top(store, "domain", T0, T0 + 3600)
    assert [(e.key, e.requests) for e in top.entries] == [("a.test", 100)]


def test_an_empty_batch_stores_nothing_and_fails_nothing(store):
    assert store.ingest("n1", 1, 0, [rec(0), rec(1)]) == IngestResult(2, 0, 0)
    assert store.ingest("n1", 1, 2, []) == IngestResult(0, 0, 0)
    assert store.ingest("n1", 1, 2, [rec(2)]) == IngestResult(1, 0, 0)


def test_quarantined_names_are_in_the_ledger_too(store):
    batch = [rec(0), b"not json", rec(2)]
    assert store.ingest("n1", 1, 0, batch) == IngestResult(2, 0, 1)
    assert store.ingest("n1", 1, 0, batch) == IngestResult(0, 3, 0)
    assert len(store.quarantined()) == 1


def test_the_same_batch_shipped_concurrently_is_stored_once(store):
    records = [rec(i) for i in range(200)]
    results = []

    def ship():
        results.append(store.ingest("n1", 7, 0, records))

    threads = [threading.Thread(target=ship) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.inserted for r in results) == [0, 0, 0, 200]
    assert store.count() == 200 and total_requests(store) == 200


def test_top_lists_of_one_node_count_only_its_records(store):
    store.ingest("n1", 1, 0, [rec(i, host="a.test" if i % 3 else "b.test", action="deny" if i % 5 == 0 else "allow")
                              for i in range(60)])
    store.ingest("n2", 1, 0, [rec(i, host="c.test") for i in range(90)])
    top = aggregate.top(store, "domain", T0, T0 + 3600, node="n1")
    assert [(e.key, e.requests, e.blocked, e.bytes) for e in top.entries] == [("a.test", 40, 8, 120), ("b.test", 20, 4, 60)]
    blocked = aggregate.top(store, "domain", T0, T0 + 3600, node="n1", by="blocked")
    assert [e.key for e in blocked.entries] == ["a.test", "b.test"]
    assert [e.key for e in aggregate.top(store, "domain", T0, T0 + 3600).entries] == ["c.test", "a.test", "b.test"]
