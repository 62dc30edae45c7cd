"""What only the PostgreSQL report store has: the schema's versions, the access_records view
(in both stores), the migration from SQLite, the --report-store URL rules."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import psycopg
import pytest

from safesquid_tw.accesslog.record import JSON_KEYS
from safesquid_tw.reporting import aggregate, pgschema
from safesquid_tw.reporting.backend import ReportStoreError, check_url, masked, open_report_store
from safesquid_tw.reporting.migrate import main as migrate_main
from safesquid_tw.reporting.migrate import migrate
from safesquid_tw.reporting.pgstore import PostgresReportStore
from safesquid_tw.reporting.sqliteview import ACCESS_RECORD_COLUMNS
from safesquid_tw.reporting.sqlitestore import ReportStore

T0 = 1_800_000_000.0


def rec(i: int, **fields) -> bytes:
    base = {"ts": T0 + i, "client": "10.0.0.7", "user": "alice", "method": "GET",
            "url": f"http://www.example.com/{i}", "status": 200, "bytes_in": 10, "bytes_out": 100,
            "duration_ms": 1.5, "action": "allow", "policy_version": 4, "dlp": ["ssn"]}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.fixture
def pg_url(postgres_server) -> str:
    return postgres_server.new_database()


def test_an_older_master_refuses_a_newer_schema(pg_url):
    PostgresReportStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (pgschema.SCHEMA_VERSION + 1,))
    with pytest.raises(pgschema.SchemaTooNew, match="newer than this gateway"):
        PostgresReportStore(pg_url)


def test_opening_again_keeps_the_schema_and_the_records(pg_url):
    first = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    first.ingest("n1", 1, 0, [rec(0)])
    first.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(pgschema.SCHEMA_VERSION,)]
    second = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        assert second.count() == 1
    finally:
        second.close()


def test_access_records_view_in_postgresql(pg_url):
    store = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        store.ingest("n1", 3, 0, [rec(0, client="not-an-ip", transfer="client_aborted"), rec(1)])
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT time, ts, client, dlp, host, pg_typeof(time)::text, pg_typeof(client)::text,"
            " pg_typeof(dlp)::text, transfer, node, segment, seq FROM access_records ORDER BY seq"
        ).fetchall()
    assert [r[5:8] for r in rows] == [("timestamp with time zone", "inet", "text[]")] * 2
    assert rows[0][1] == T0 and rows[0][0].timestamp() == T0
    assert rows[0][2] is None and str(rows[1][2]) == "10.0.0.7"  # a bad address reads as NULL
    assert rows[1][3] == ["ssn"] and rows[1][4] == "www.example.com"
    assert rows[0][8] == "client_aborted" and rows[0][9:] == ("n1", 3, 0)


def test_access_records_view_in_sqlite(tmp_path):
    store = ReportStore(tmp_path / "r.db")
    try:
        store.ingest("n1", 3, 0, [rec(0)])
        row = store.reader().execute(
            "SELECT time, ts, client, dlp, host, transfer, tls FROM access_records").fetchone()
    finally:
        store.close()
    assert row == ("2027-01-15T08:00:00.000Z", T0, "10.0.0.7", '["ssn"]', "www.example.com", "complete", None)


def test_records_far_from_now_go_to_the_default_partition(pg_url):
    store = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        # Both within the store's accepted years, but beyond the partitions kept around now.
        far_past, far_future = -(pgschema.PAST_DAYS_PARTITIONED + 30) * 86400, (pgschema.FUTURE_DAYS_PARTITIONED + 30) * 86400
        assert store.ingest("n1", 1, 0, [rec(0), rec(far_past), rec(far_future)]).inserted == 3
        assert store.count() == 3
        with store._write_lock:
            assert store._connection().execute("SELECT count(*) FROM requests_other").fetchone()[0] == 2
    finally:
        store.close()


def test_text_the_database_cannot_hold_is_cleaned_not_fatal(pg_url):
    store = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        odd = rec(0, user="a\u0000b\tc\\d\ne", url="http://x.test/\ud800", dlp=["\u0000x"], status=2**40)
        assert store.ingest("n1", 1, 0, [odd, rec(1, user="a\u0000b\tc\\d\ne")]) .inserted == 1
        [stored] = store.search(start=T0, end=T0 + 60)
        assert stored["user"] == "ab\tc\\d\ne"
        assert "out of range" in store.quarantined()[0]["reason"]
        odd_groups = ['a"b', "c\\d", "e,f}", "NULL", "", "\u0000x", "\ud800y", "g h"]
        assert store.ingest("n1", 2, 0, [rec(2, groups=odd_groups)]).inserted == 1
        [stored] = store.search(start=T0 + 2, end=T0 + 3)
        assert stored["groups"] == ['a"b', "c\\d", "e,f}", "NULL", "", "x", "?y", "g h"]
    finally:
        store.close()


def fill_sqlite(path: Path) -> ReportStore:
    rng = random.Random(3)
    store = ReportStore(path)
    for node in ("n1", "n2", "n3"):
        for segment in (1, 2):
            records = [rec(rng.randrange(0, 7200), user=rng.choice(["a", "b", None]),
                           url=rng.choice(["http://a.test/", "b.test:443", "http://www.a.test/x"]),
                           action=rng.choice(["allow", "deny", "error"]), rule=rng.choice([None, "r1"]),
                           transfer=rng.choice(["complete", "client_aborted"]),
                           tls=rng.choice([None, "inspected", "bypassed"]), groups=rng.choice([[], ["g1", "g 2"]]))
                       for _ in range(120)]
            store.ingest(node, segment, 0, records[:70])
            store.ingest(node, segment, 50, records[50:])
    store.ingest("n1", 9, 0, [b"not json"])
    store.record_dropped("n2", 17)
    return store


def test_migration_copies_exactly_once_resumes_and_keeps_the_rollups(tmp_path, pg_url):
    lite = fill_sqlite(tmp_path / "reports.sqlite3")
    pg = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        out = io.StringIO()
        first = migrate(tmp_path / "reports.sqlite3", pg, chunk=100, out=out, stop_after=2)
        assert first["inserted"] == 200 and pg.count() == 200
        # Pretend the run died after copying but before remembering the last chunk.
        pg._write("UPDATE migration_progress SET last_id = last_id - 100")
        rest = migrate(tmp_path / "reports.sqlite3", pg, chunk=100, out=out)
        assert rest["duplicates"] == 100 and rest["inserted"] == 720 - 200
        assert "100.0%" in out.getvalue()
        assert migrate(tmp_path / "reports.sqlite3", pg, out=out)["inserted"] == 0
        assert pg.count() == lite.count() == 720
        start, end = T0, T0 + 7200
        assert aggregate.totals(pg, start, end) == aggregate.totals(lite, start, end)
        assert aggregate.totals(pg, start, end).errors and aggregate.totals(pg, start, end).aborted
        for step in (60, 3600):
            assert aggregate.timeline(pg, start, end, step=step) == aggregate.timeline(lite, start, end, step=step)
        assert aggregate.per_node(pg, start, end) == aggregate.per_node(lite, start, end)
        for dimension in ("domain", "user", "rule"):
            assert aggregate.top(pg, dimension, start, end) == aggregate.top(lite, dimension, start, end)
        def by_name(found):
            return sorted(found, key=lambda r: (r["node"], r["segment"], r["seq"]))

        assert by_name(pg.search(start=start, end=end, limit=1000)) == by_name(lite.search(start=start, end=end, limit=1000))
        assert any(r["groups"] == ["g1", "g 2"] for r in pg.search(start=start, end=end, limit=1000))
        for filters in ({"tls": "none"}, {"tls": "inspected"}, {"transfer": "client_aborted"}):
            assert pg.count(start=start, end=end, **filters) == lite.count(start=start, end=end, **filters) > 0
        assert [q["raw"] for q in pg.quarantined()] == [b"not json"]
        assert pg.dropped_totals() == {"n2": 17}
    finally:
        pg.close()
        lite.close()


def test_migration_command_line(tmp_path, pg_url, capsys):
    fill_sqlite(tmp_path / "reports.sqlite3").close()
    assert migrate_main([str(tmp_path / "reports.sqlite3"), pg_url]) == 0
    assert "copied 720 records" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        migrate_main([str(tmp_path / "reports.sqlite3"), "postgresql://u:secret@127.0.0.1/x"])
    assert "secret" not in capsys.readouterr().err


@pytest.mark.parametrize("url", ["mysql://h/db", "postgresql://u:pw@h/db", "postgresql://h/db?password=pw",
                                 "postgresql:///db"])
def test_report_store_urls_refused(url):
    with pytest.raises(ReportStoreError):
        check_url("report-store", url)


def test_passwords_are_masked_and_the_default_is_sqlite(tmp_path):
    assert masked("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    check_url("report-store", "postgresql://reports@db.example:5432/reports?sslmode=verify-full")
    store = open_report_store(None, tmp_path)
    try:
        assert isinstance(store, ReportStore)
    finally:
        store.close()


def test_password_file_is_used(postgres_server, tmp_path):
    url = postgres_server.new_database()
    (tmp_path / "pw").write_text("anything\n")  # trust authentication accepts any password
    store = open_report_store(url, tmp_path, password_file=str(tmp_path / "pw"))
    try:
        assert store.available()
    finally:
        store.close()


def test_reads_go_to_the_read_url(postgres_server):
    primary, replica = postgres_server.new_database(), postgres_server.new_database()
    PostgresReportStore(replica).close()  # an empty copy of the schema stands in for a replica
    store = PostgresReportStore(primary, read_url=replica, wall_clock=lambda: T0)
    try:
        store.ingest("n1", 1, 0, [rec(0)])
        assert store.count() == 0 and aggregate.totals(store, T0, T0 + 60).requests == 0
    finally:
        store.close()
    direct = PostgresReportStore(primary)
    try:
        assert direct.count() == 1
    finally:
        direct.close()


def test_a_long_period_is_counted_from_the_rollups_and_its_ends(pg_url):
    store = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        store.ingest("n1", 1, 0, [rec(i * 97) for i in range(200)])
        store.ingest("n2", 1, 0, [rec(i * 131) for i in range(100)])
        for start, end, node in [(T0 + 13.5, T0 + 15_000.25, None), (T0 - 60, T0 + 20_000, "n2"),
                                 (T0 + 59.9, T0 + 7260.1, "n1")]:
            expected = len(store.search(start=start, end=end, node=node, limit=10_000))
            assert store.count(start=start, end=end, node=node) == expected
        with store._write_lock:  # the roll-ups really answer: skew them and see
            store._connection().execute(
                "UPDATE rollup_minute SET requests = requests + 1000 WHERE (bucket, node) ="
                " (SELECT bucket, node FROM rollup_minute WHERE bucket >= %s ORDER BY bucket LIMIT 1)", (T0 + 600,))
        assert store.count(start=T0, end=T0 + 7200) == len(store.search(start=T0, end=T0 + 7200, limit=10_000)) + 1000
    finally:
        store.close()


def test_every_key_of_the_record_is_kept_and_the_views_agree(tmp_path, pg_url):
    records = [rec(0, transfer="client_aborted", tls="inspected", groups=["staff", "it admins"]),
               rec(1, action="error", status=502, tls="bypassed"), rec(2)]
    pg = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    lite = ReportStore(tmp_path / "r.sqlite3")
    try:
        for store in (pg, lite):
            store.ingest("n1", 1, 0, records)
            window = {"start": T0 - 1, "end": T0 + 60}
            found = sorted(store.search(**window), key=lambda r: r["seq"])
            assert [r["groups"] for r in found] == [["staff", "it admins"], [], []]
            assert [r["transfer"] for r in found] == ["client_aborted", "complete", "complete"]
            assert [r["seq"] for r in store.search(**window, tls="none")] == [2]
            assert [r["seq"] for r in store.search(**window, tls="bypassed")] == [1]
            assert store.count(**window, transfer="client_aborted") == 1
            assert store.count(**window, transfer="complete") == 2
            totals = aggregate.totals(store, T0, T0 + 60)
            assert (totals.requests, totals.errors, totals.aborted) == (3, 1, 1)
            [bucket] = [b for b in aggregate.timeline(store, T0, T0 + 3600, step=3600) if b.totals.requests]
            assert (bucket.totals.errors, bucket.totals.aborted) == (1, 1)
        assert aggregate.per_node(pg, T0, T0 + 60) == aggregate.per_node(lite, T0, T0 + 60)
        lite_view = lite.reader().execute("SELECT * FROM access_records ORDER BY seq")
        lite_columns = [d[0] for d in lite_view.description]
        lite_rows = lite_view.fetchall()
    finally:
        pg.close()
        lite.close()
    with psycopg.connect(pg_url) as conn:
        cur = conn.execute("SELECT *, pg_typeof(groups)::text FROM access_records ORDER BY seq")
        pg_columns = [d.name for d in cur.description][:-1]
        pg_rows = cur.fetchall()
    assert pg_columns == lite_columns == list(ACCESS_RECORD_COLUMNS)
    keys = set(JSON_KEYS) | {"host", "segment", "seq"}
    assert set(pg_columns) == keys
    at = pg_columns.index
    assert pg_rows[0][-1] == "text[]"
    assert pg_rows[0][at("groups")] == ["staff", "it admins"] and pg_rows[2][at("groups")] == []
    assert lite_rows[0][at("groups")] == '["staff", "it admins"]' and lite_rows[2][at("groups")] == "[]"
    for name in ("transfer", "tls", "action", "status", "host", "node", "segment", "seq"):
        assert [r[at(name)] for r in pg_rows] == [r[at(name)] for r in lite_rows], name


def test_a_version_1_database_is_upgraded_in_place(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute(pgschema.MIGRATIONS[0])
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute("INSERT INTO rollup_minute VALUES (%s, 'n1', 3, 1, 10, 20)", (int(T0),))
        conn.execute(
            "INSERT INTO requests (node, segment, seq, time, bytes_in, bytes_out, action)"
            " VALUES ('n1', 1, 0, to_timestamp(%s), 1, 2, 'allow')", (T0,))
        # An administrator's own view on the stable one must survive the upgrade.
        conn.execute("CREATE VIEW my_hosts AS SELECT host, count(*) AS n FROM access_records GROUP BY host")
    store = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        totals = aggregate.totals(store, T0, T0 + 60)
        assert (totals.requests, totals.errors, totals.aborted) == (3, 0, 0)
        store.ingest("n1", 2, 0, [rec(5, transfer="client_aborted", groups=["g"])])
        assert aggregate.totals(store, T0, T0 + 60).aborted == 1
        [old] = store.search(start=T0, end=T0 + 1)
        assert old["transfer"] is None and old["groups"] == []
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(pgschema.SCHEMA_VERSION,)]
        rows = conn.execute("SELECT transfer, groups FROM access_records ORDER BY seq, segment").fetchall()
        assert rows == [("complete", []), ("client_aborted", ["g"])]
        assert conn.execute("SELECT sum(n) FROM my_hosts").fetchone()[0] == 2
def test_a_database_too_slow_is_unavailable_and_stores_nothing_meanwhile(pg_url, monkeypatch):
    from safesquid_tw.reporting import pgstore
    from safesquid_tw.reporting.backend import StoreUnavailable

    monkeypatch.setattr(pgstore, "WRITE_TIMEOUT_MS", 300)
    monkeypatch.setattr(pgstore, "READ_TIMEOUT_MS", 300)
    store = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        with psycopg.connect(pg_url) as blocker:  # holds the roll-ups until the block ends
            blocker.execute("LOCK TABLE rollup_minute IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreUnavailable):
                store.ingest("n1", 1, 0, [rec(0)])
            with pytest.raises(StoreUnavailable):
                aggregate.totals(store, T0, T0 + 60)
        assert store.count() == 0
        assert store.ingest("n1", 1, 0, [rec(0)]).inserted == 1  # the slave's next try
        assert aggregate.totals(store, T0, T0 + 60).requests == 1
    finally:
        store.close()


def test_both_stores_satisfy_the_interface(tmp_path, pg_url):
    from safesquid_tw.reporting.backend import ReportStoreBackend

    for store in (ReportStore(tmp_path / "r.db"), PostgresReportStore(pg_url)):
        try:
            assert isinstance(store, ReportStoreBackend)
        finally:
            store.close()


def test_a_version_5_database_gets_room_in_its_rollup_pages(pg_url):
    """Version 6 sets a fillfactor on the roll-ups that every commit updates (HOT updates), on
    the partitions that exist and on those made later; the counts already there stay."""
    day = pgschema.day_of(T0)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        for step in pgschema.MIGRATIONS[:5]:
            conn.execute(step)
        conn.execute("INSERT INTO schema_version VALUES (5)")
        for table in ("requests", "rollup_top_hour", "rollup_top_node_hour"):
            low, high = ((f"'{day * 86400}'", f"'{(day + 1) * 86400}'") if table != "requests" else
                         (f"to_timestamp({day * 86400})", f"to_timestamp({(day + 1) * 86400})"))
            conn.execute(f"CREATE TABLE {pgschema.partition_name(day, table)} PARTITION OF {table}"
                         f" FOR VALUES FROM ({low}) TO ({high})")
        hour = int(T0) // 3600 * 3600
        conn.execute("INSERT INTO rollup_top_hour VALUES ('domain', %s, 'www.example.com', 4, 0, 40)", (hour,))
        conn.execute("INSERT INTO rollup_top_day VALUES ('domain', %s, 'www.example.com', 4, 0, 40)", (day * 86400,))
    store = PostgresReportStore(pg_url, wall_clock=lambda: T0)
    try:
        store.ingest("n1", 1, 0, [rec(1), rec(2)])
        [entry] = aggregate.top(store, "domain", hour, hour + 3600).entries
        assert (entry.key, entry.requests, entry.bytes) == ("www.example.com", 6, 260)
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(pgschema.SCHEMA_VERSION,)]
        options = dict(conn.execute(
            "SELECT relname, reloptions FROM pg_class WHERE relname IN (%s, %s, 'rollup_top_day', 'rollup_minute',"
            " 'rollup_hour', 'rollup_top_hour_other')",
            (pgschema.partition_name(day, "rollup_top_hour"), pgschema.partition_name(day + 1, "rollup_top_hour")),
        ).fetchall())
    assert len(options) == 6 and all(value == ["fillfactor=60"] for value in options.values()), options
