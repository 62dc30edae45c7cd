"""How fast the portal's reports stay with millions of access records.

Fills a report store with synthetic records (5 million by default, spread over the last week and
over several nodes, through the store's own ingest), then times what the portal does for a page:
the last day's dashboard (the queries and the HTML with its SVG charts) and a search of the
requests table (a first page, filtered pages, the total count). The target is under half a
second for the dashboard.

    python bench/report_bench.py                      # 5 million records in a temporary store
    python bench/report_bench.py --records 200000      # a quicker run
    python bench/report_bench.py --db /tmp/r.sqlite3   # keep the store; a second run reuses it
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safesquid_tw.pages import render_template  # noqa: E402
from safesquid_tw.portal import reportdata as R  # noqa: E402
from safesquid_tw.portal.pages_reports import TOP_TITLES, charts  # noqa: E402
from safesquid_tw.portal.svgchart import human_bytes  # noqa: E402
from safesquid_tw.reporting.sqlitestore import ReportStore  # noqa: E402

TARGET_S = 0.5
BATCH = 5000
WEEK = 7 * 86400


def synthetic_records(count: int, now: float, nodes: int, seed: int = 7):
    """(node, records) batches of JSON access records, oldest first, like slaves ship them."""
    rng = random.Random(seed)
    domains = [f"site{i}.example" for i in range(3000)]
    users = [f"user{i}" for i in range(800)] + [None] * 200
    categories = [None, None, "news", "social", "shopping", "adult", "gambling", "streaming", "webmail"]
    applications = [None] * 6 + ["chat", "video", "storage", "mail"]
    rules = ["block-adult", "block-gambling", "block-games", "no-uploads", "dlp-cards"]
    start = now - WEEK
    step = WEEK / count
    produced = 0
    while produced < count:
        size = min(BATCH, count - produced)
        node = f"node{produced // BATCH % nodes + 1}"
        batch = []
        for i in range(size):
            ts = start + (produced + i) * step
            blocked = rng.random() < 0.08
            domain = domains[int(rng.paretovariate(1.2)) % len(domains)]
            batch.append(json.dumps({
                "ts": ts, "node": node, "client": f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}",
                "user": rng.choice(users), "method": "GET", "url": f"https://{domain}/page/{rng.randrange(1000)}",
                "status": 403 if blocked else 200, "bytes_in": rng.randrange(200, 2000),
                "bytes_out": 0 if blocked else rng.randrange(500, 500000), "duration_ms": rng.random() * 300,
                "action": "deny" if blocked else "allow", "rule": rng.choice(rules) if blocked else None,
                "category": rng.choice(categories), "application": rng.choice(applications),
                "policy_version": 3,
            }, separators=(",", ":")).encode())
        yield node, produced // BATCH, batch
        produced += size


def fill(store: ReportStore, count: int, now: float, nodes: int) -> float:
    started = time.perf_counter()
    done = 0
    group = []
    for node, segment, records in synthetic_records(count, now, nodes):
        group.append((node, segment, 1, records))
        if len(group) == 8:
            store.ingest_many(group)
            done += sum(len(g[3]) for g in group)
            group = []
            print(f"\r  ingested {done:,} records", end="", flush=True)
    if group:
        store.ingest_many(group)
    print()
    return time.perf_counter() - started


def timed(label: str, fn, repeat: int = 5) -> float:
    fn()  # a first run warms the page cache, as a portal that is in use has it warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    print(f"  {label:<52} median {median * 1000:8.1f} ms   max {max(times) * 1000:8.1f} ms")
    return median


def render_dashboard(store: ReportStore, now: float, node: str | None = None) -> bytes:
    period = R.parse_period({"period": "day"}, now)
    data = R.dashboard_data(store, period, node)
    return render_template(
        "portal/dashboard.html",
        account="bench", csrf="", flashes=[], role="master", node="bench", read_only=False, master_address=None,
        has_reports=True, has_registry=True, path="/reports", period=period,
        inputs={"start": "", "end": ""}, node_filter=node, nodes=data["nodes"], data=data,
        charts=charts(data, period.step), top_titles=TOP_TITLES, query={},
        export=lambda table: "/reports/export.csv", human_bytes=human_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5_000_000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--db", type=Path, default=None, help="store file (kept; reused when it has records)")
    args = parser.parse_args(argv)

    workdir = None
    if args.db is None:
        workdir = tempfile.TemporaryDirectory(prefix="report-bench-")
        args.db = Path(workdir.name) / "reports.sqlite3"
    store = ReportStore(args.db)
    existing = store.count()
    meta = args.db.with_suffix(".now")
    if existing >= args.records and meta.exists():
        now = float(meta.read_text())
        print(f"reusing {existing:,} records in {args.db}")
    else:
        now = time.time()
        print(f"filling {args.db} with {args.records:,} records over the last week ({args.nodes} nodes)")
        seconds = fill(store, args.records, now, args.nodes)
        meta.write_text(repr(now))
        print(f"  {args.records:,} records in {seconds:.0f} s ({args.records / seconds:,.0f} records/s)")
    total = store.count()
    print(f"store holds {total:,} records, {args.db.stat().st_size / 1e6:,.0f} MB\n")

    period = R.parse_period({"period": "day"}, now)
    print("dashboard (last day):")
    dashboard = timed("whole cluster: queries + HTML with SVG charts", lambda: render_dashboard(store, now))
    timed("one node: queries + HTML", lambda: render_dashboard(store, now, "node1"))
    timed("queries only", lambda: R.dashboard_data(store, period, None))
    timed("top applications only", lambda: R.top_applications(store, period.start, period.end, node=None, limit=10))
    print("requests table (last day, 50 per page):")
    timed("first page", lambda: R.search_data(store, period, {}, 1))
    timed("page 100", lambda: R.search_data(store, period, {}, 100))
    timed("user filter", lambda: R.search_data(store, period, {"user": "user3"}, 1))
    timed("domain filter (and subdomains)", lambda: R.search_data(store, period, {"domain": "site5.example"}, 1))
    timed("blocked only", lambda: R.search_data(store, period, {"action": "deny"}, 1))
    week = R.parse_period({"period": "week"}, now)
    timed("week dashboard: queries + HTML", lambda: render_dashboard_week(store, now, week))
    verdict = "PASS" if dashboard < TARGET_S else "FAIL"
    print(f"\nlast-day dashboard: {dashboard * 1000:.0f} ms against a target of {TARGET_S * 1000:.0f} ms: {verdict}")
    store.close()
    if workdir is not None:
        workdir.cleanup()
    return 0 if dashboard < TARGET_S else 1


def render_dashboard_week(store: ReportStore, now: float, period: R.ReportPeriod) -> bytes:
    data = R.dashboard_data(store, period, None)
    return bytes(charts(data, period.step)["requests"], "utf-8")


if __name__ == "__main__":
    sys.exit(main())
