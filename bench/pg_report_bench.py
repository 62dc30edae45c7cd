"""The report store in SQLite and in PostgreSQL, side by side, on the same records.

Records shaped like real traffic (20 nodes, 2,000 clients, 1,500 users, 50,000 hosts with a
Pareto popularity, 7 days, oldest first) go through the master's real ingest path: `ingest`
called by one thread per node, batches of 500 (a slave's shipment), durable commits (SQLite
synchronous=FULL; PostgreSQL fsync=on, synchronous_commit=on), roll-ups counted at ingest.
Records are generated in rounds outside the timed part; each round goes to both stores.

Then, on the full stores: the last-day dashboard (totals, per node, timeline, every top 10), the
same for one node, a top-10 of domains over the whole week, searches (50 newest of a day:
unfiltered with its count, by user, by client, by domain), and the retention of the oldest day
(everything before the UTC midnight that ends it). For query timings at 50 M records see
`pg_bulk_load.py`.

    python bench/pg_report_bench.py --records 1000000
    python bench/pg_report_bench.py --records 5000000 --pg-url postgresql://reports@127.0.0.1:5432/bench

Without --pg-url a PostgreSQL server is started from the distribution's binaries in a temporary
directory (run as root: initdb runs as the postgres user). Printed: records/s and CPU seconds of
this process per record for each store, and the ratio of PostgreSQL's rate to the target of
60,000 records/s (2x today's master). On a shared machine the rates move with the other load;
the CPU per record less so.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from ingest_bench import Generator  # noqa: E402

from safesquid_tw.reporting import aggregate  # noqa: E402
from safesquid_tw.reporting.pgstore import PostgresReportStore  # noqa: E402
from safesquid_tw.reporting.sqlitestore import ReportStore  # noqa: E402

TARGET_RATE = 60_000
TODAY_RATE = 29_700  # today's master (SQLite), as measured when the target was set
DAY = 86400


def rounds(args: argparse.Namespace, now: float):
    """Rounds of {node: [(segment, first_seq, records)]}, covering `days` days oldest first."""
    nodes = [f"node{i + 1:02d}" for i in range(args.nodes)]
    generators = {node: Generator(i, args.hosts, args.users, args.clients, now) for i, node in enumerate(nodes)}
    per_node = args.records // len(nodes)
    span = args.span or args.days * DAY
    step = span / per_node
    chunk = max(args.batch, args.chunk // len(nodes) // args.batch * args.batch)
    for offset in range(0, per_node, chunk):
        count = min(chunk, per_node - offset)
        work = {}
        for node in nodes:
            batches = []
            for first in range(offset, offset + count, args.batch):
                size = min(args.batch, offset + count - first)
                start = now - span + first * step
                batches.append((first // (args.batch * 20), first % (args.batch * 20),
                                generators[node].batch(node, start, step, size)))
            work[node] = batches
        yield work


POSTMASTER: int | None = None  # the pid of the server this bench started, when it did


def postgres_cpu() -> float:
    """CPU seconds used so far by the PostgreSQL processes that are still running (the server's
    backends, WAL writer, checkpointer): those of the server this bench started, else every one
    on this machine; 0 where /proc cannot tell."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        if name.startswith("postgres"):
            fields = text[text.rfind(")") + 2 :].split()
            if POSTMASTER is not None and POSTMASTER not in (int(stat.parent.name), int(fields[1])):
                continue  # another server's (fields[1]: the parent's pid)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


class Wire:
    """What the master does with a shipped batch before the store sees it: Banana decoding of
    the Perspective Broker message (ship_log_lines, or ship_log_batch with --wire list), its
    jelly, the contract's checks and the split into records. The slave's encoding is done
    outside the timed part."""

    def __init__(self, kind: str) -> None:
        from twisted.internet.testing import StringTransport
        from twisted.spread import banana, jelly

        from safesquid_tw.cluster import wire

        self.kind, self.banana, self.jelly, self.wire = kind, banana, jelly, wire
        self._transport = StringTransport

    def _codec(self, received: list) -> Any:
        codec = self.banana.Banana()
        codec.connectionReady = lambda: None
        codec.expressionReceived = received.append
        codec.makeConnection(self._transport())
        codec._selectDialect(b"pb")
        return codec

    def encode(self, segment: int, first_seq: int, records: list[bytes]) -> bytes:
        codec = self._codec([])
        if self.kind == "lines":
            call = ["message", 1, b"ship_log_lines", 1, [segment, first_seq, self.wire.join_log_lines(records)], {}]
        else:
            call = ["message", 1, b"ship_log_batch", 1, [segment, first_seq, records], {}]
        codec.sendEncoded(self.jelly.jelly(call))
        return codec.transport.value()

    def decode(self, data: bytes) -> tuple[int, int, list[bytes]]:
        received: list = []
        self._codec(received).dataReceived(data)
        _message, _id, name, _answer, args, _kw = self.jelly.unjelly(received[0])
        segment, first_seq, payload = self.wire.check_args("avatar", name.decode(), args, {})
        records = self.wire.split_log_lines(payload) if self.kind == "lines" else payload
        return segment, first_seq, records


def ingest_round(store: Any, work: dict[str, list], wire: "Wire | None" = None) -> tuple[float, float]:
    if wire is not None:
        work = {node: [wire.encode(*batch) for batch in batches] for node, batches in work.items()}

    def ship(node: str) -> None:
        for batch in work[node]:
            segment, first_seq, records = batch if wire is None else wire.decode(batch)
            store.ingest(node, segment, first_seq, records)

    threads = [threading.Thread(target=ship, args=(node,)) for node in work]
    began, began_cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, time.process_time() - began_cpu


def best_of(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def queries(store: Any, now: float, days: int) -> dict[str, float]:
    day_ago = now - DAY
    return {
        "dashboard, last day": best_of(3, lambda: aggregate.dashboard(store, now)),
        # (its top lists are remembered until the next commit in PostgreSQL: timed cold)
        "dashboard, last day, one node": best_of(3, lambda: (aggregate._NODE_TOPS.clear(),
                                                             aggregate.dashboard(store, now, node="node01"))),
        "dashboard, whole week": best_of(3, lambda: aggregate.dashboard(store, now, hours=days * 24)),
        "top 10 domains, week": best_of(3, lambda: aggregate.top(store, "domain", now - days * DAY, now)),
        "search: newest 50 of a day": best_of(3, lambda: store.search(start=day_ago, end=now)),
        "count of a day (page count)": best_of(3, lambda: store.count(start=day_ago, end=now)),
        "search by user, a day": best_of(3, lambda: store.search(start=day_ago, end=now, user="user7")),
        "search by client, a day": best_of(3, lambda: store.search(start=day_ago, end=now, client="10.0.0.42")),
        "search by domain, a day": best_of(3, lambda: store.search(start=day_ago, end=now, domain="site42.example")),
        "search by user, count, a day": best_of(3, lambda: store.count(start=day_ago, end=now, user="user7")),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--chunk", type=int, default=200_000, help="records generated per timed round")
    parser.add_argument("--hosts", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=1_500)
    parser.add_argument("--clients", type=int, default=2_000)
    parser.add_argument("--pg-url", help="an empty PostgreSQL database (default: start a temporary server)")
    parser.add_argument("--sqlite-dir", help="directory for the SQLite file (default: a temporary one)")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--skip-postgresql", action="store_true")
    parser.add_argument("--wire", choices=("lines", "list", "none"), default="lines",
                        help="decode each batch as the master receives it (default: lines, as slaves ship"
                             " it now; list: as they shipped it before; none: call ingest directly)")
    parser.add_argument("--skip-queries", action="store_true", help="ingest only")
    parser.add_argument("--span", type=float, help="the records cover the last SPAN seconds instead of --days"
                        " (records as dense in time as traffic at the rate measured: 1,000,000 records at"
                        " 60,000/s span 17 s; spread over 7 days, each batch of 500 spans hours and counts"
                        " hundreds of roll-up rows)")
    args = parser.parse_args(argv)

    global POSTMASTER
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the server and clean up
    now = time.time()
    server = None
    tmp = tempfile.TemporaryDirectory(prefix="pg-report-bench-", dir=args.sqlite_dir)
    stores: dict[str, Any] = {}
    try:
        if args.pg_url is None and not args.skip_postgresql:
            from pgserver import PostgresServer, why_not_available

            reason = why_not_available()
            if reason:
                parser.error(reason)
            server = PostgresServer(fsync=True)
            server.start()
            args.pg_url = server.new_database("bench")
            POSTMASTER = int((server.data / "postmaster.pid").read_text().split()[0])
        if not args.skip_sqlite:
            stores["sqlite"] = ReportStore(Path(tmp.name) / "reports.sqlite3")
        if not args.skip_postgresql:
            stores["postgresql"] = PostgresReportStore(args.pg_url)
        wire = None if args.wire == "none" else Wire(args.wire)
        spent = {name: [0.0, 0.0, 0.0] for name in stores}
        done = 0
        print(f"{args.records:,} records, {args.nodes} nodes, {args.days} days, batches of {args.batch}")
        for work in rounds(args, now):
            count = sum(len(r) for batches in work.values() for _s, _f, r in batches)
            done += count
            line = [f"{done:>11,}"]
            for name, store in stores.items():
                server_before = postgres_cpu()
                elapsed, cpu = ingest_round(store, work, wire)
                spent[name][0] += elapsed
                spent[name][1] += cpu
                if name == "postgresql":
                    spent[name][2] += postgres_cpu() - server_before
                line.append(f"{name} {count / elapsed:>8,.0f}/s")
            print("  ".join(line), flush=True)
        print()
        for name, (elapsed, cpu, server_cpu) in spent.items():
            rate = done / elapsed
            print(f"ingest {name:<10} {rate:>9,.0f} records/s  (x{rate / TODAY_RATE:.2f} today's {TODAY_RATE:,}/s,"
                  f" x{rate / TARGET_RATE:.2f} the target {TARGET_RATE:,}/s)")
            print(f"       CPU per record: master {cpu / done * 1e6:.1f} µs"
                  + (f", PostgreSQL server {server_cpu / done * 1e6:.1f} µs" if name == "postgresql" else ""))
            print(f"       CPU seconds per 100,000 records: master {cpu / done * 1e5:.2f} s"
                  + (f", PostgreSQL server {server_cpu / done * 1e5:.2f} s" if name == "postgresql" else ""))
        print()
        if args.skip_queries:
            return
        timings = {name: queries(store, now, args.days) for name, store in stores.items()}
        names = list(stores)
        print(f"{'at ' + format(done, ',') + ' records':<34}" + "".join(f"{n:>14}" for n in names))
        for query in timings[names[0]]:
            print(f"{query:<34}" + "".join(f"{timings[n][query] * 1000:>11.1f} ms" for n in names))
        # The oldest day: every record before the UTC midnight that follows it. (A cut inside a
        # day deletes that day's older records one by one in PostgreSQL too.)
        cutoff = (now - (args.days - 1) * DAY) // DAY * DAY
        for name, store in stores.items():
            began = time.perf_counter()
            if name == "postgresql":  # the day's partitions detached, then dropped blocking nothing
                removed = store.prune(cutoff, reclaim=False)
                detached = time.perf_counter() - began
                store.reclaim_space()
                print(f"retention of the oldest day, {name}: {detached:.2f} s ({removed:,} records), then"
                      f" {time.perf_counter() - began - detached:.2f} s to drop the detached partitions")
                continue
            removed = store.prune(cutoff)
            print(f"retention of the oldest day, {name}: {time.perf_counter() - began:.2f} s ({removed:,} records)")
    finally:
        for store in stores.values():
            store.close()
        if server is not None:
            server.destroy()
        tmp.cleanup()


if __name__ == "__main__":
    main()
