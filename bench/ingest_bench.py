"""Report-store ingest benchmark: how fast the master stores the access records of its slaves.

Synthetic records (the JSON a slave ships) spread over the last day are ingested in batches of
500 by one thread per simulated node, all at once, into a fresh store on disk; the store commits
one transaction per batch with synchronous=FULL, as in production. Printed: records per second
against the reference of 20,000/s, the rate of the last round (the store already full), and the
time of the last-day dashboard (totals, per node, hourly timeline, top 10 of each dimension) and
of two searches at that size.

Records are generated in chunks outside the timed part, so the figure is the store's alone.

    python bench/ingest_bench.py --records 1000000
    python bench/ingest_bench.py --records 5000000 --db /var/tmp/reports.db
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safesquid_tw.reporting import aggregate  # noqa: E402
from safesquid_tw.reporting.sqlitestore import ReportStore  # noqa: E402

REFERENCE_RATE = 20_000  # records per second the master must sustain
DAY = 86400
_ACTIONS = ["allow"] * 85 + ["deny"] * 8 + ["tunnel"] * 5 + ["auth", "error"]
_METHODS = ["GET"] * 80 + ["POST"] * 12 + ["CONNECT"] * 8
_STATUSES = [200] * 70 + [304, 301, 302, 404, 403, 500, 502] * 4
_GROUPS = [[]] * 2 + [["staff"], ["staff", "sales"], ["it", "admins"]]
_TLS = ["inspected", "bypassed"]


class Generator:
    """Records like the proxy writes them, with realistic key counts (hosts, users, clients)."""

    def __init__(self, seed: int, hosts: int, users: int, clients: int, now: float) -> None:
        self.rng = random.Random(seed)
        self.hosts = [f"www.site{i}.example" if i % 3 else f"cdn{i % 7}.site{i}.test" for i in range(hosts)]
        self.users = [None] + [f"user{i}" for i in range(users)]
        self.clients = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(clients)]
        self.categories = [None] * 5 + [f"category-{i}" for i in range(20)]
        self.rules = [None] * 10 + [f"rule-{i}" for i in range(40)]
        self.now = now

    def batch(self, node: str, start: float, step: float, count: int) -> list[bytes]:
        rng = self.rng
        records = []
        for i in range(count):
            host = self.hosts[min(int(rng.paretovariate(1.2)) - 1, len(self.hosts) - 1)]
            method = rng.choice(_METHODS)
            action = rng.choice(_ACTIONS)
            url = f"{host}:443" if method == "CONNECT" else f"http://{host}/path/{rng.randrange(10**6)}?q=1"
            when = start + i * step
            record = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + ".000Z",
                "ts": when,
                "node": node,
                "client": rng.choice(self.clients),
                "user": rng.choice(self.users),
                "method": method,
                "url": url,
                "status": 403 if action == "deny" else rng.choice(_STATUSES),
                "bytes_in": rng.randrange(200, 2000),
                "bytes_out": rng.randrange(300, 500_000),
                "duration_ms": round(rng.random() * 800, 3),
                "action": action,
                "rule": rng.choice(self.rules),
                "category": rng.choice(self.categories),
                "application": None,
                "policy_version": 7,
                "dlp": [],
                "detail": None,
                # The keys every record carries since policy groups, transfers and TLS inspection.
                "groups": _GROUPS[rng.randrange(len(_GROUPS))],
                "transfer": "client_aborted" if rng.random() < 0.01 else "complete",
                "tls": _TLS[rng.randrange(len(_TLS))] if method == "CONNECT" else None,
            }
            records.append(json.dumps(record, separators=(",", ":")).encode("ascii"))
        return records


def fill(store: ReportStore, args: argparse.Namespace, now: float) -> tuple[float, float, float, int]:
    """Ingest all records; returns (seconds and CPU seconds spent ingesting, rate of the last
    round, records)."""
    nodes = [f"node{i + 1}" for i in range(args.nodes)]
    generators = {node: Generator(i, args.hosts, args.users, args.clients, now) for i, node in enumerate(nodes)}
    per_node = args.records // len(nodes)
    step = DAY / per_node  # each node's records cover the last day, oldest first
    chunk = max(args.batch, args.chunk // len(nodes) // args.batch * args.batch)
    timed = cpu = last_rate = 0.0
    done = 0
    for offset in range(0, per_node, chunk):
        count = min(chunk, per_node - offset)
        work = {}
        for node in nodes:
            batches = []
            for first in range(offset, offset + count, args.batch):
                size = min(args.batch, offset + count - first)
                start = now - DAY + first * step
                # segment = batch index // 20: a segment of 10,000 records, as shipped by a slave
                batches.append((first // (args.batch * 20), first % (args.batch * 20),
                                generators[node].batch(node, start, step, size)))
            work[node] = batches

        def ingest(node: str) -> None:
            for segment, first_seq, records in work[node]:
                store.ingest(node, segment, first_seq, records)

        threads = [threading.Thread(target=ingest, args=(node,)) for node in nodes]
        began, began_cpu = time.perf_counter(), time.process_time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        timed += elapsed
        cpu += time.process_time() - began_cpu
        done += count * len(nodes)
        last_rate = count * len(nodes) / elapsed
        print(f"  {done:>10,} records stored, {last_rate:>9,.0f} records/s", flush=True)
    return timed, cpu, last_rate, done


def best_of(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--chunk", type=int, default=150_000, help="records generated per timed round")
    parser.add_argument("--hosts", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=5_000)
    parser.add_argument("--db", help="store file (default: a new temporary directory)")
    args = parser.parse_args(argv)

    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="ingest-bench-")
        args.db = str(Path(tmp.name) / "reports.db")
    elif Path(args.db).exists():
        parser.error(f"{args.db} exists; the benchmark needs a fresh store")
    now = time.time()
    store = ReportStore(args.db)
    try:
        print(f"ingesting {args.records:,} records from {args.nodes} nodes in batches of {args.batch}")
        timed, cpu, tail_rate, done = fill(store, args, now)
        rate = done / timed
        dashboard_s = best_of(3, lambda: aggregate.dashboard(store, now))
        search_user_s = best_of(3, lambda: store.search(start=now - DAY, end=now, user="user7"))
        search_domain_s = best_of(3, lambda: store.search(start=now - DAY, end=now, domain="site42.example"))
        size = Path(args.db).stat().st_size
        print()
        print(f"ingest:           {rate:>10,.0f} records/s  ratio to {REFERENCE_RATE:,}/s: {rate / REFERENCE_RATE:.2f}")
        print(f"ingest, full:     {tail_rate:>10,.0f} records/s  ratio to {REFERENCE_RATE:,}/s: {tail_rate / REFERENCE_RATE:.2f}")
        print(f"CPU per record:   {cpu / done * 1e6:>10.1f} µs ({done / cpu:,.0f} records per CPU second;"
              " the machine's other load lowers the figures above, not this one)")
        print(f"last-day dashboard at {done:,} records: {dashboard_s * 1000:.0f} ms")
        print(f"search by user (50 newest of a day):   {search_user_s * 1000:.1f} ms")
        print(f"search by domain (50 newest of a day): {search_domain_s * 1000:.1f} ms")
        print(f"store size: {size / 1e6:,.0f} MB ({size / done:.0f} bytes per record)")
    finally:
        store.close()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
