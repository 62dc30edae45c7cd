"""Query timings of the SQLite report store at tens of millions of records, loaded in bulk.

The SQLite counterpart of `pg_bulk_load.py`: a store of the current schema is filled the fast
way (documented as such in bench/README.rst), not through ingest: records shaped like
`ingest_bench.Generator`'s (20 nodes, 2,000 clients, 1,500 users, 50,000 hosts with a
Pareto(1.2) popularity, 7 days, the same host, user and client names) are generated inside
SQLite, one day at a time, with the record indexes dropped during the load and built afterwards;
the roll-ups are then counted from the records with GROUP BY, what ingest would have counted.
The draws are a multiplicative hash of the record's number rather than random(): SQLite may
evaluate a random() column once per reference. Then the same dashboard, top-N, search and
retention timings as `pg_report_bench.py`.

    python bench/sqlite_bulk_load.py --records 50000000 --dir /var/tmp
    python bench/sqlite_bulk_load.py --skip-load --dir DIR   # time the queries again
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from pg_report_bench import DAY, queries  # noqa: E402

from safesquid_tw.reporting.sqlitestore import _SCHEMA, ReportStore  # noqa: E402

INDEXES = ("requests_time", "requests_user", "requests_client", "requests_host", "requests_rule")


def _draw(column: str, multiplier: int) -> str:
    """A number in [0, 1) that looks random, from the record's number `i` (one per column)."""
    return f"((({column} + 1) * {multiplier}) % 4294967291) / 4294967291.0"


_FILL_DAY = f"""
WITH RECURSIVE series(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM series WHERE i + 1 < :count),
draws AS (
    SELECT i, min(CAST(pow(1 - {_draw("i", 2654435761)}, -1 / 1.2) AS INTEGER) - 1, :hosts - 1) AS k,
           CAST({_draw("i", 40503)} * :clients AS INTEGER) AS c,
           CAST({_draw("i", 2246822519)} * (:users + 1) AS INTEGER) AS u,
           CAST({_draw("i", 3266489917)} * 100 AS INTEGER) AS m,
           CAST({_draw("i", 668265263)} * 100 AS INTEGER) AS a,
           CAST({_draw("i", 374761393)} * 50 AS INTEGER) AS r,
           CAST({_draw("i", 2654435769)} * 25 AS INTEGER) AS ca,
           CAST({_draw("i", 1103515245)} * 5 AS INTEGER) AS g,
           {_draw("i", 12345)} AS x, {_draw("i", 1664525)} AS y, {_draw("i", 22695477)} AS z
    FROM series
),
rows AS (
    SELECT d.*, h.host, h.host_rev,
           CASE WHEN m < 80 THEN 'GET' WHEN m < 92 THEN 'POST' ELSE 'CONNECT' END AS method,
           CASE WHEN a < 85 THEN 'allow' WHEN a < 93 THEN 'deny' WHEN a < 98 THEN 'tunnel' WHEN a = 98 THEN 'auth'
                ELSE 'error' END AS action,
           :start + i * :step AS time
    FROM draws AS d JOIN bulk_hosts AS h ON h.k = d.k
)
INSERT INTO requests (node, segment, seq, time, minute, client, user, method, url, host, host_rev, status,
                      bytes_in, bytes_out, duration_ms, action, rule, category, application, policy_version,
                      dlp, detail, transfer, tls, groups)
SELECT 'node' || printf('%02d', 1 + i % :nodes), (:first_seq + i / :nodes) / 10000, :first_seq + i / :nodes,
       time, CAST(time / 60 AS INTEGER), '10.0.' || (c / 256) || '.' || (c % 256),
       CASE WHEN u = 0 THEN NULL ELSE 'user' || (u - 1) END, method,
       CASE WHEN method = 'CONNECT' THEN host || ':443'
            ELSE 'http://' || host || '/path/' || CAST(x * 1e6 AS INTEGER) || '?q=1' END,
       host, host_rev, CASE WHEN action = 'deny' THEN 403 ELSE 200 END,
       200 + CAST(y * 1800 AS INTEGER), 300 + CAST(z * 499700 AS INTEGER), round(x * 800, 3), action,
       CASE WHEN r < 10 THEN NULL ELSE 'rule-' || (r - 10) END,
       CASE WHEN ca < 5 THEN NULL ELSE 'category-' || (ca - 5) END, NULL, 7, NULL, NULL,
       CASE WHEN y < 0.01 THEN 'client_aborted' ELSE 'complete' END,
       CASE WHEN method = 'CONNECT' THEN CASE WHEN z < 0.5 THEN 'inspected' ELSE 'bypassed' END END,
       CASE WHEN g < 2 THEN NULL WHEN g = 2 THEN '["staff"]' WHEN g = 3 THEN '["staff", "sales"]'
            ELSE '["it", "admins"]' END
FROM rows
"""

_ROLLUPS = """
INSERT INTO rollup_minute (bucket, node, requests, blocked, bytes_in, bytes_out, errors, aborted)
SELECT minute * 60, node, count(*), sum(action IN ('deny', 'block')), sum(bytes_in), sum(bytes_out),
       sum(action = 'error'), sum(transfer = 'client_aborted')
FROM requests GROUP BY minute, node;
INSERT INTO rollup_hour (bucket, node, requests, blocked, bytes_in, bytes_out, errors, aborted)
SELECT bucket - bucket % 3600, node, sum(requests), sum(blocked), sum(bytes_in), sum(bytes_out), sum(errors),
       sum(aborted) FROM rollup_minute GROUP BY 1, 2;
"""


def _top_rollup(dimension: str, column: str) -> str:
    return (
        "INSERT INTO rollup_top (dimension, bucket, node, key, requests, blocked, bytes)"
        f" SELECT '{dimension}', (minute / 60) * 3600, node, {column}, count(*),"
        " sum(action IN ('deny', 'block')), sum(bytes_in + bytes_out)"
        f" FROM requests WHERE {column} IS NOT NULL GROUP BY 2, 3, 4"
    )


_TOPS = (("domain", "host"), ("user", "user"), ("category", "category"), ("application", "application"),
         ("rule", "rule"))
_WIDER = (
    "INSERT INTO rollup_top_hour (dimension, bucket, key, requests, blocked, bytes)"
    " SELECT dimension, bucket, key, sum(requests), sum(blocked), sum(bytes) FROM rollup_top GROUP BY 1, 2, 3",
    "INSERT INTO rollup_top_day (dimension, bucket, key, requests, blocked, bytes)"
    " SELECT dimension, bucket - bucket % 86400, key, sum(requests), sum(blocked), sum(bytes)"
    " FROM rollup_top_hour GROUP BY 1, 2, 3",
)


def load(path: Path, args: argparse.Namespace, now: float) -> int:
    """Fill a new store at `path` in bulk; the number of records loaded."""
    began = time.perf_counter()
    ReportStore(path).close()  # the schema, as the master makes it
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1048576")  # 1 GiB while indexing
    conn.execute("PRAGMA temp_store = FILE")
    for name in INDEXES:
        conn.execute(f"DROP INDEX {name}")
    conn.execute("CREATE TEMP TABLE bulk_hosts (k INTEGER PRIMARY KEY, host TEXT, host_rev TEXT)")
    hosts = [f"www.site{k}.example" if k % 3 else f"cdn{k % 7}.site{k}.test" for k in range(args.hosts)]
    conn.executemany("INSERT INTO bulk_hosts VALUES (?, ?, ?)", ((k, h, h[::-1]) for k, h in enumerate(hosts)))
    per_day = args.records // args.days
    start = now - args.days * DAY
    for d in range(args.days):
        conn.execute("BEGIN")
        conn.execute(_FILL_DAY, {
            "start": start + d * DAY, "step": DAY / per_day, "count": per_day, "nodes": args.nodes,
            "first_seq": d * (per_day // args.nodes + 1), "hosts": args.hosts, "clients": args.clients,
            "users": args.users})
        conn.execute("COMMIT")
        print(f"day {d + 1}/{args.days}: {(d + 1) * per_day:,} records, {time.perf_counter() - began:.0f} s",
              flush=True)
    conn.executescript(_SCHEMA)  # the dropped indexes again (IF NOT EXISTS: the rest stays)
    print(f"indexes built, {time.perf_counter() - began:.0f} s", flush=True)
    conn.execute("BEGIN")
    for statement in _ROLLUPS.split(";")[:2]:
        conn.execute(statement)
    print(f"minute and hour roll-ups, {time.perf_counter() - began:.0f} s", flush=True)
    for dimension, column in _TOPS:
        conn.execute(_top_rollup(dimension, column))
    print(f"top roll-up, {time.perf_counter() - began:.0f} s", flush=True)
    for statement in _WIDER:
        conn.execute(statement)
    conn.execute("COMMIT")
    print(f"cluster-wide top roll-ups, {time.perf_counter() - began:.0f} s", flush=True)
    conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
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
    parser.add_argument("--dir", help="where the store file goes (kept with --skip-load; default: a temporary"
                                      " directory, removed at the end)")
    parser.add_argument("--skip-load", action="store_true", help="the store in --dir is loaded: time the queries")
    parser.add_argument("--no-retention", action="store_true", help="leave the oldest day in place")
    args = parser.parse_args(argv)

    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sqlite-bulk-")
        args.dir = tmp.name
    path = Path(args.dir) / "reports.sqlite3"
    try:
        if args.skip_load:
            with sqlite3.connect(path) as conn:
                now = conn.execute("SELECT max(time) FROM requests").fetchone()[0] + 1
                total = conn.execute("SELECT sum(requests) FROM rollup_hour").fetchone()[0]
        else:
            now = time.time()
            total = load(path, args, now)
        size = sum(p.stat().st_size for p in Path(args.dir).glob("reports.sqlite3*")) / 2**30
        store = ReportStore(path, wall_clock=lambda: now)
        print(f"{total:,} records ({size:.1f} GiB)")
        timings = queries(store, now, args.days)
        print(f"{'at ' + format(total, ',') + ' records':<34}{'sqlite':>14}")
        for query, seconds in timings.items():
            print(f"{query:<34}{seconds * 1000:>11.1f} ms", flush=True)
        if not args.no_retention:
            cutoff = (now - (args.days - 1) * DAY) // DAY * DAY  # the oldest whole UTC day goes
            began = time.perf_counter()
            removed = store.prune(cutoff)
            print(f"retention of the oldest day, sqlite: {time.perf_counter() - began:.2f} s ({removed:,} records)")
        store.close()
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
