"""Query timings of the PostgreSQL report store at tens of millions of records, loaded in bulk.

Ingest through the master's real path is measured by `pg_report_bench.py` on a smaller count;
pushing 50 M records through it here would take the better part of an hour on a shared 2-core
machine. This script fills a store of the current schema the fast way instead (documented as
such in bench/README.rst): records shaped like `ingest_bench.Generator`'s (20 nodes, 2,000
clients, 1,500 users, 50,000 hosts with a Pareto(1.2) popularity, 7 days, the same host, user and
client names) are generated inside the server with `generate_series`, one day partition at a time,
with the record indexes dropped during the load and built afterwards; the roll-ups and the ledger
of stored names are then computed from the records with GROUP BY, exactly what ingest would have
counted. Then the same dashboard, top-N, search and retention timings as `pg_report_bench.py`.

    python bench/pg_bulk_load.py --records 50000000
    python bench/pg_bulk_load.py --records 50000000 --pg-url postgresql://reports@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from pg_report_bench import DAY, queries  # noqa: E402

from safesquid_tw.reporting import pgschema  # noqa: E402
from safesquid_tw.reporting.pgstore import PostgresReportStore  # noqa: E402


# One day of records: row i of the day belongs to node i % nodes; each column draws its own
# random numbers (same shapes as ingest_bench.Generator).
_FILL_DAY = """
INSERT INTO requests (node, segment, seq, time, client, "user", method, url, host, host_rev, status,
                      bytes_in, bytes_out, duration_ms, action, rule, category, application, policy_version,
                      dlp, detail, transfer, tls, groups)
SELECT node, seq / 10000, seq, to_timestamp(%(start)s + i * %(step)s), client, "user", method,
       CASE WHEN method = 'CONNECT' THEN host || ':443' ELSE 'http://' || host || '/path/' || (random() * 1e6)::int || '?q=1' END,
       host, reverse(host), CASE WHEN action = 'deny' THEN 403 ELSE 200 END,
       200 + (random() * 1800)::int, 300 + (random() * 499700)::int, round((random() * 800)::numeric, 3),
       action, rule, category, NULL, '7', NULL, NULL,
       CASE WHEN random() < 0.01 THEN 'client_aborted' ELSE 'complete' END,
       CASE WHEN method = 'CONNECT' THEN (ARRAY['inspected', 'bypassed'])[1 + (random() * 2)::int %% 2] END,
       CASE WHEN g < 2 THEN NULL WHEN g = 2 THEN '{staff}'::text[] WHEN g = 3 THEN '{staff,sales}' ELSE '{it,admins}' END
FROM (
    SELECT i, 'node' || lpad((1 + i %% %(nodes)s)::text, 2, '0') AS node,
           %(first_seq)s + i / %(nodes)s AS seq,
           CASE WHEN k %% 3 <> 0 THEN 'www.site' || k || '.example' ELSE 'cdn' || k %% 7 || '.site' || k || '.test' END AS host,
           '10.0.' || c / 256 || '.' || c %% 256 AS client,
           CASE WHEN u = 0 THEN NULL ELSE 'user' || (u - 1) END AS "user",
           CASE WHEN m < 80 THEN 'GET' WHEN m < 92 THEN 'POST' ELSE 'CONNECT' END AS method,
           CASE WHEN a < 85 THEN 'allow' WHEN a < 93 THEN 'deny' WHEN a < 98 THEN 'tunnel' WHEN a = 98 THEN 'auth' ELSE 'error' END AS action,
           CASE WHEN r < 10 THEN NULL ELSE 'rule-' || (r - 10) END AS rule,
           CASE WHEN ca < 5 THEN NULL ELSE 'category-' || (ca - 5) END AS category, g
    FROM (
        SELECT i, least(floor(power(1 - random(), -1 / 1.2))::int - 1, %(hosts)s - 1) AS k,
               (random() * %(clients)s)::int %% %(clients)s AS c, (random() * (%(users)s + 1))::int %% (%(users)s + 1) AS u,
               (random() * 100)::int %% 100 AS m, (random() * 100)::int %% 100 AS a, (random() * 50)::int %% 50 AS r,
               (random() * 25)::int %% 25 AS ca, (random() * 5)::int %% 5 AS g
        FROM generate_series(0, %(count)s - 1) AS i
    ) AS draws
) AS rows
"""

_ROLLUPS = """
INSERT INTO rollup_minute (bucket, node, requests, blocked, bytes_in, bytes_out, errors, aborted)
SELECT (floor(extract(epoch FROM time) / 60) * 60)::bigint, node, count(*),
       count(*) FILTER (WHERE action IN ('deny', 'block')), sum(bytes_in), sum(bytes_out),
       count(*) FILTER (WHERE action = 'error'), count(*) FILTER (WHERE transfer = 'client_aborted')
FROM requests GROUP BY 1, 2;
INSERT INTO rollup_hour (bucket, node, requests, blocked, bytes_in, bytes_out, errors, aborted)
SELECT bucket - bucket % 3600, node, sum(requests), sum(blocked), sum(bytes_in), sum(bytes_out), sum(errors),
       sum(aborted) FROM rollup_minute GROUP BY 1, 2;
INSERT INTO rollup_top_hour (dimension, bucket, key, requests, blocked, bytes)
SELECT d.dimension, (floor(extract(epoch FROM time) / 3600) * 3600)::bigint, d.key, count(*),
       count(*) FILTER (WHERE action IN ('deny', 'block')), sum(bytes_in + bytes_out)
FROM requests CROSS JOIN LATERAL (VALUES ('domain', host), ('user', "user"), ('category', category),
     ('application', application), ('rule', rule)) AS d(dimension, key)
WHERE d.key IS NOT NULL GROUP BY 1, 2, 3;
INSERT INTO rollup_top_day (dimension, bucket, key, requests, blocked, bytes)
SELECT dimension, bucket - bucket % 86400, key, sum(requests), sum(blocked), sum(bytes)
FROM rollup_top_hour GROUP BY 1, 2, 3;
INSERT INTO ingest_ledger (node, segment, first_seq, last_seq, last_time)
SELECT node, segment, min(seq), max(seq), extract(epoch FROM max(time)) FROM requests GROUP BY 1, 2;
"""


def fill_node_hours(store: PostgresReportStore, now: float, days: float) -> None:
    """The per-node hourly top roll-up of every hour of the last `days` days before the current
    one (what ingest counts as each node leaves an hour), from the records with GROUP BY; older
    hours are left out to keep the load short (one node's dashboard reads the last day)."""
    began = time.perf_counter()
    hour = int(now // 3600 * 3600)
    with store._write_lock:
        conn = store._connection()
        conn.execute("SET statement_timeout = 0")
        conn.execute("SET work_mem = '256MB'")
        conn.execute(
            "INSERT INTO rollup_top_node_hour (node, bucket, dimension, key, requests, blocked, bytes)"
            " SELECT node, (floor(extract(epoch FROM time) / 3600) * 3600)::bigint, d.dimension, d.key, count(*),"
            " count(*) FILTER (WHERE action IN ('deny', 'block')), sum(bytes_in + bytes_out)"
            " FROM requests CROSS JOIN LATERAL (VALUES ('domain', host), ('user', \"user\"), ('category', category),"
            " ('application', application), ('rule', rule)) AS d(dimension, key)"
            " WHERE time >= to_timestamp(%s) AND time < to_timestamp(%s) AND d.key IS NOT NULL GROUP BY 1, 2, 3, 4",
            (hour - days * DAY, hour))
        conn.execute("INSERT INTO rollup_top_node_filled (node, bucket) SELECT DISTINCT node, bucket"
                     " FROM rollup_top_node_hour ON CONFLICT DO NOTHING")
        conn.execute("ANALYZE rollup_top_node_hour")
    print(f"per-node hourly top roll-up of the last {days:g} days counted, {time.perf_counter() - began:.0f} s",
          flush=True)


def load(store: PostgresReportStore, args: argparse.Namespace, now: float) -> int:
    """Fill the store in bulk; the number of records loaded."""
    began = time.perf_counter()
    with store._write_lock:
        conn = store._connection()
        conn.execute("SET statement_timeout = 0")
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SET work_mem = '256MB'")
        first_day = pgschema.day_of(now - args.days * DAY)
        for day in range(first_day, pgschema.day_of(now) + 1):
            with conn.transaction():
                pgschema.create_day(conn, day)
        # The schema's own record indexes (whatever its version makes them), dropped for the
        # load and built again from their definitions afterwards.
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'requests' AND schemaname = current_schema()"
        ).fetchall()
        for name, _definition in indexes:
            conn.execute(f"DROP INDEX {name}")
        per_day = args.records // args.days
        start = now - args.days * DAY
        for d in range(args.days):
            conn.execute(_FILL_DAY, {
                "start": start + d * DAY, "step": DAY / per_day, "count": per_day, "nodes": args.nodes,
                "first_seq": d * (per_day // args.nodes + 1), "hosts": args.hosts, "clients": args.clients,
                "users": args.users})
            print(f"day {d + 1}/{args.days}: {(d + 1) * per_day:,} records, {time.perf_counter() - began:.0f} s",
                  flush=True)
        for _name, definition in indexes:
            conn.execute(definition.replace(" ON ONLY ", " ON "))
        print(f"indexes built, {time.perf_counter() - began:.0f} s", flush=True)
        conn.execute(_ROLLUPS)
        conn.execute("ANALYZE")
        print(f"roll-ups counted, analysed, {time.perf_counter() - began:.0f} s", flush=True)
    return per_day * args.days


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000_000)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--hosts", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=1_500)
    parser.add_argument("--clients", type=int, default=2_000)
    parser.add_argument("--pg-url", help="an empty PostgreSQL database (default: start a temporary server)")
    parser.add_argument("--skip-load", action="store_true",
                        help="the database at --pg-url is already loaded: only time the queries")
    parser.add_argument("--no-retention", action="store_true",
                        help="leave the oldest day in place (to time the queries again later)")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    now = time.time()
    server = None
    store = None
    try:
        if args.pg_url is None:
            from pgserver import PostgresServer, why_not_available

            reason = why_not_available()
            if reason:
                parser.error(reason)
            server = PostgresServer(fsync=True)
            server.start()
            args.pg_url = server.new_database("bulk")
        store = PostgresReportStore(args.pg_url, wall_clock=lambda: now)
        if args.skip_load:
            with store._write_lock:
                conn = store._connection()
                last = conn.execute("SELECT extract(epoch FROM max(time)) FROM requests").fetchone()[0]
                size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
                total = conn.execute("SELECT sum(requests) FROM rollup_hour").fetchone()[0]
                counted = conn.execute("SELECT count(*) FROM rollup_top_node_filled").fetchone()[0]
            now = float(last) + 1
            store._wall_clock = lambda: now
            if not counted:  # loaded before schema version 5
                fill_node_hours(store, now, 2)
        else:
            total = load(store, args, now)
            fill_node_hours(store, now, 2)
            size = store._connection().execute(
                "SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
        print(f"{total:,} records loaded in bulk ({size})")
        timings = queries(store, now, args.days)
        print(f"{'at ' + format(total, ',') + ' records':<34}{'postgresql':>14}")
        for query, seconds in timings.items():
            print(f"{query:<34}{seconds * 1000:>11.1f} ms")
        cutoff = (now - (args.days - 1) * DAY) // DAY * DAY  # the oldest whole UTC day goes
        began = time.perf_counter()
        if args.no_retention:
            return
        removed = store.prune(cutoff, reclaim=False)
        detached = time.perf_counter() - began
        store.reclaim_space()
        print(f"retention of the oldest day, postgresql: {detached:.2f} s ({removed:,} records), then"
              f" {time.perf_counter() - began - detached:.2f} s to drop the detached partitions (blocking nothing)")
    finally:
        if store is not None:
            store.close()
        if server is not None:
            server.destroy()


if __name__ == "__main__":
    main()
