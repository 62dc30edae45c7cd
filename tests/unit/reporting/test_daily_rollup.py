"""Top lists over whole days read the daily top roll-up: the same answers as the hourly one,
through ingest, re-shipment, retention and an upgrade of an older store, in both backends."""

import json
import sqlite3

import pytest

from safesquid_tw.reporting import aggregate
from safesquid_tw.reporting.sqlitestore import IngestResult, ReportStore

DAY = 86400
NOW = 1_790_000_000.0 // DAY * DAY + 13 * 3600 + 1234  # a fixed time in the middle of a UTC day


def record(ts: float, host: str, user: str, action: str = "allow") -> bytes:
    return json.dumps({"ts": ts, "client": "10.0.0.1", "user": user, "method": "GET",
                       "url": f"http://{host}/", "status": 200, "bytes_in": 10, "bytes_out": 5,
                       "action": action, "rule": f"r-{host}", "category": "news"}).encode()


def traffic(node: int) -> list[bytes]:
    """Nine days of records, every 37 minutes, over a few hosts and users."""
    out = []
    t = NOW - 9 * DAY
    i = node
    while t < NOW:
        out.append(record(t, f"h{i % 7}.test", f"u{i % 5}", "deny" if i % 11 == 0 else "allow"))
        t += 37 * 60 + node
        i += 1
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = ReportStore(tmp_path / "reports.sqlite3", wall_clock=lambda: NOW)
    else:
        from safesquid_tw.reporting.pgstore import PostgresReportStore

        s = PostgresReportStore(request.getfixturevalue("postgres_server").new_database(), wall_clock=lambda: NOW)
    yield s
    s.close()


def hourly_top(store, dimension: str, start: float, end: float, by: str = "requests") -> list[tuple]:
    """What the hourly roll-up alone says (the answer before the daily one existed)."""
    period = aggregate.widen(start, end, aggregate.HOUR)
    rows = store.reader().execute(
        "SELECT key, sum(requests) AS requests, sum(blocked) AS blocked, sum(bytes) AS bytes FROM rollup_top_hour"
        f" WHERE dimension = ? AND bucket >= ? AND bucket < ? GROUP BY key ORDER BY {by} DESC, key LIMIT 10",
        (dimension, period.start, period.end),
    )
    return [tuple(row) for row in rows]


def ship(store) -> None:
    for node in (1, 2, 3):
        records = traffic(node)
        for first in range(0, len(records), 50):
            store.ingest(f"n{node}", 1, first, records[first : first + 50])


def as_rows(top: aggregate.TopList) -> list[tuple]:
    return [(e.key, e.requests, e.blocked, e.bytes) for e in top.entries]


PERIODS = [(NOW - 7 * DAY, NOW), (NOW - 8.5 * DAY, NOW - 1.2 * DAY), (NOW - 2 * DAY, NOW), (NOW - 3600, NOW),
           (NOW - DAY, NOW), (NOW - DAY - 11.8 * 3600, NOW - DAY + 6.8 * 3600), (NOW - 13 * 3600, NOW)]


def test_week_top_lists_equal_the_hourly_sums(store):
    ship(store)
    ship(store)  # re-shipped: counted once
    for start, end in PERIODS:
        for dimension in aggregate.TOP_DIMENSIONS:
            for by in ("requests", "blocked", "bytes"):
                expected = hourly_top(store, dimension, start, end, by)
                got = as_rows(aggregate.top(store, dimension, start, end, by=by))
                if by == "blocked":
                    expected = [row for row in expected if row[2]]
                assert got == expected, (dimension, by, start, end)


def test_retention_keeps_the_daily_roll_up_equal_to_the_hourly_one(store):
    ship(store)
    cutoff = NOW - 5.5 * DAY  # in the middle of a day
    store.prune(cutoff)
    for dimension in ("domain", "user"):
        assert as_rows(aggregate.top(store, dimension, NOW - 9 * DAY, NOW)) == hourly_top(
            store, dimension, NOW - 9 * DAY, NOW)
    days = {b for (b,) in store.reader().execute("SELECT DISTINCT bucket FROM rollup_top_day")}
    assert min(days) == cutoff // DAY * DAY


def test_an_older_sqlite_store_gains_a_filled_daily_roll_up(tmp_path):
    path = tmp_path / "reports.sqlite3"
    store = ReportStore(path, wall_clock=lambda: NOW)
    ship(store)
    expected = as_rows(aggregate.top(store, "domain", NOW - 7 * DAY, NOW))
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE rollup_top_day")  # as a store of the previous release
    conn.commit()
    conn.close()
    store = ReportStore(path, wall_clock=lambda: NOW)
    try:
        assert as_rows(aggregate.top(store, "domain", NOW - 7 * DAY, NOW)) == expected
        assert store.reader().execute("SELECT count(*) FROM rollup_top_day").fetchone()[0] > 0
    finally:
        store.close()


def test_a_version_3_postgresql_schema_is_upgraded_in_place(postgres_server):
    """A database of schema version 3 (a unique key on every record, a per-node hourly top
    roll-up) gains the ledger of stored names and the cluster-wide hourly top roll-up, filled
    from what it holds: the same top lists, and a re-shipment is still counted once."""
    import psycopg

    from safesquid_tw.reporting import pgschema
    from safesquid_tw.reporting.pgstore import PostgresReportStore

    reference = PostgresReportStore(postgres_server.new_database(), wall_clock=lambda: NOW)
    ship(reference)
    expected = {(d, p): as_rows(aggregate.top(reference, d, *p)) for d in ("domain", "user") for p in PERIODS}
    with reference._write_lock:
        columns = [r[0] for r in reference._connection().execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'requests'"
            " ORDER BY ordinal_position")]
        names = ", ".join(f'"{c}"' for c in columns)
        records = reference._connection().execute(f"SELECT {names} FROM requests").fetchall()
        minutes = reference._connection().execute("SELECT * FROM rollup_minute").fetchall()
        hours = reference._connection().execute("SELECT * FROM rollup_hour").fetchall()
        days = reference._connection().execute("SELECT * FROM rollup_top_day").fetchall()
    reference.close()
    url = postgres_server.new_database()
    with psycopg.connect(url, autocommit=True) as conn:  # as the previous release left it
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        for step in pgschema.MIGRATIONS[:3]:
            conn.execute(step)
        conn.execute("INSERT INTO schema_version VALUES (3)")
        first_day = int((NOW - 9 * DAY) // DAY)
        for day in range(first_day, first_day + 10):
            conn.execute(f"CREATE TABLE {pgschema.partition_name(day)} PARTITION OF requests FOR VALUES FROM"
                         f" (to_timestamp({day * DAY})) TO (to_timestamp({(day + 1) * DAY}))")
            conn.execute(f"CREATE TABLE {pgschema.partition_name(day, 'rollup_top')} PARTITION OF rollup_top"
                         f" FOR VALUES FROM ({day * DAY}) TO ({(day + 1) * DAY})")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO requests ({names}) VALUES ({', '.join(['%s'] * len(columns))})", records)
            cur.executemany("INSERT INTO rollup_minute VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", minutes)
            cur.executemany("INSERT INTO rollup_hour VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", hours)
            cur.executemany("INSERT INTO rollup_top_day VALUES (%s, %s, %s, %s, %s, %s)", days)
        conn.execute(
            "INSERT INTO rollup_top (dimension, bucket, node, key, requests, blocked, bytes)"
            " SELECT d.dimension, (floor(extract(epoch FROM time) / 3600) * 3600)::bigint, node, d.key, count(*),"
            " count(*) FILTER (WHERE action IN ('deny', 'block')), sum(bytes_in + bytes_out) FROM requests"
            " CROSS JOIN LATERAL (VALUES ('domain', host), ('user', \"user\"), ('category', category),"
            " ('application', application), ('rule', rule)) AS d(dimension, key) WHERE d.key IS NOT NULL"
            " GROUP BY 1, 2, 3, 4")
        # A record whose batch never arrived (its roll-ups aside): the ledger must leave its name open.
        conn.execute("DELETE FROM requests WHERE node = 'n2' AND seq = 3")
    store = PostgresReportStore(url, wall_clock=lambda: NOW)
    try:
        assert store.reader().execute("SELECT max(version) FROM schema_version").fetchone()[0] == pgschema.SCHEMA_VERSION
        assert store.reader().execute(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'rollup_top'").fetchone()[0] == 0
        for (dimension, period), rows in expected.items():
            assert as_rows(aggregate.top(store, dimension, *period)) == rows, (dimension, period)
        assert store.count() == len(records) - 1
        ship(store)  # everything again: only the missing record is stored
        assert store.count() == len(records)
        assert store.ingest("n2", 1, 0, traffic(2)[:50]) == IngestResult(0, 50, 0)
    finally:
        store.close()


def minute_totals(store, start: float, end: float, node: str | None = None) -> tuple:
    period = aggregate.widen(start, end, aggregate.MINUTE)
    clause, params = ("", ()) if node is None else (" AND node = ?", (node,))
    return tuple(store.reader().execute(
        "SELECT coalesce(sum(requests), 0), coalesce(sum(blocked), 0), coalesce(sum(bytes_in), 0),"
        " coalesce(sum(bytes_out), 0), coalesce(sum(errors), 0), coalesce(sum(aborted), 0)"
        f" FROM rollup_minute WHERE bucket >= ? AND bucket < ?{clause}", (period.start, period.end, *params),
    ).fetchone())


def as_tuple(t: aggregate.Totals) -> tuple:
    return (t.requests, t.blocked, t.bytes_in, t.bytes_out, t.errors, t.aborted)


def test_totals_over_hours_equal_the_minute_sums_before_and_after_retention(store):
    ship(store)
    periods = PERIODS + [(NOW - 1800, NOW - 60), (NOW - 5000, NOW - 10)]
    for pruned in (False, True):
        if pruned:
            store.prune(NOW - 5.5 * DAY - 1234)  # in the middle of an hour
        for start, end in periods + [(NOW - 9 * DAY, NOW)]:
            assert as_tuple(aggregate.totals(store, start, end)) == minute_totals(store, start, end)
            assert as_tuple(aggregate.totals(store, start, end, node="n2")) == minute_totals(store, start, end, "n2")
            per_node = aggregate.per_node(store, start, end)
            assert {n: as_tuple(t) for n, t in per_node.items()} == {
                n: minute_totals(store, start, end, n) for n in per_node}
