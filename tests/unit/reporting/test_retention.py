"""Old records leave the report store in the background, at start and then hourly."""

import json
import time
import types

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import defer, reactor, task

from safesquid_tw.config import NodeConfig
from safesquid_tw.assembly.base import NodeBase
from safesquid_tw.util.threads import reactor_pool
from safesquid_tw.reporting.sqlitestore import ReportStore


def record(ts: float, url: str) -> bytes:
    return json.dumps({"ts": ts, "node": "n1", "client": "10.0.0.1", "method": "GET", "url": url,
                       "status": 200, "bytes_in": 1, "bytes_out": 2, "duration_ms": 1.0,
                       "action": "allow"}).encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield ReportStore(tmp_path / "reports.sqlite3")
    else:
        from safesquid_tw.reporting.pgstore import PostgresReportStore

        yield PostgresReportStore(request.getfixturevalue("postgres_server").new_database())


@pytest_twisted.inlineCallbacks
def test_records_past_the_retention_go_and_newer_ones_stay(store):
    now = time.time()
    store.ingest("n1", 1, 0, [record(now - 10 * 86400, "http://old.test/"), record(now - 3600, "http://new.test/")])
    clock = task.Clock()
    clock.advance(now)
    base = types.SimpleNamespace(config=NodeConfig(report_retention_days=7), reactor=clock, top=MultiService(),
                                 in_thread=reactor_pool)
    NodeBase.report_retention(base, store)
    base.top.startService()  # the first run is at start-up; the work itself runs in a thread
    for _ in range(100):
        if store.count(start=0, end=now + 1) == 1:
            break
        yield task.deferLater(reactor, 0.05, lambda: None)
    assert [r["url"] for r in store.search(start=0, end=now + 1)] == ["http://new.test/"]
    yield defer.maybeDeferred(base.top.stopService)
    store.close()


def test_retention_drops_whole_day_partitions_in_postgresql(postgres_server):
    from safesquid_tw.reporting import pgschema
    from safesquid_tw.reporting.pgstore import PostgresReportStore

    now = time.time()
    store = PostgresReportStore(postgres_server.new_database())
    try:
        days_ago = [20, 12, 9, 1]
        for i, age in enumerate(days_ago):
            store.ingest("n1", 1, i * 10, [record(now - age * 86400 + j, f"http://d{age}.test/") for j in range(10)])
        with store._write_lock:
            days = pgschema.partitioned_days(store._connection())
        today = pgschema.day_of(now)
        assert {today - age for age in days_ago} <= days
        assert {today + 1, today + 2} <= days  # created ahead of the records
        assert store.prune(now - 10 * 86400) == 20
        with store._write_lock:
            left = pgschema.partitioned_days(store._connection())
        assert today - 20 not in left and today - 12 not in left and today - 9 in left
        with store._write_lock:  # the day's top roll-up partition went with it
            tables = {name for (name,) in store._connection().execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'rollup_top_%'")}
        assert pgschema.partition_name(today - 12, "rollup_top_hour") not in tables
        assert pgschema.partition_name(today - 9, "rollup_top_hour") in tables
        assert sorted({r["url"] for r in store.search(start=0, end=now + 1, limit=100)}) == [
            "http://d1.test/", "http://d9.test/"]
    finally:
        store.close()


def test_postgresql_retention_detaches_the_days_and_drops_them_apart(postgres_server):
    """A day leaves every query when its partitions are detached; their files go in a DROP of
    their own afterwards (its unlinking holds no lock ingest or a report needs), left for the
    next call when asked."""
    from safesquid_tw.reporting import pgschema
    from safesquid_tw.reporting.pgstore import PostgresReportStore

    now = time.time()
    store = PostgresReportStore(postgres_server.new_database())
    try:
        store.ingest("n1", 1, 0, [record(now - 12 * 86400 + j, "http://old.test/") for j in range(5)])
        store.ingest("n1", 1, 5, [record(now - 86400 + j, "http://new.test/") for j in range(5)])
        old_day = pgschema.day_of(now - 12 * 86400)
        assert store.prune(now - 10 * 86400, reclaim=False) == 5
        with store._write_lock:
            conn = store._connection()
            retired = pgschema.retired_tables(conn)
            assert retired == sorted(pgschema.RETIRED_PREFIX + pgschema.partition_name(old_day, table)
                                     for table in pgschema.DAY_PARTITIONED)
            assert old_day not in pgschema.partitioned_days(conn)
        assert {r["url"] for r in store.search(start=0, end=now + 1, limit=100)} == {"http://new.test/"}
        # A late record of the retired day makes a new partition beside the retired one.
        store.ingest("n1", 2, 0, [record(now - 12 * 86400 + 30, "http://late.test/")])
        assert store.count(start=0, end=now - 5 * 86400) == 1
        assert store.reclaim_space() == 3
        with store._write_lock:
            assert pgschema.retired_tables(store._connection()) == []
        # The next retention takes the late record's day out the same way and drops it.
        assert store.prune(now - 10 * 86400) == 1
        with store._write_lock:
            assert pgschema.retired_tables(store._connection()) == []
        assert store.count(start=0, end=now + 1) == 5
    finally:
        store.close()
