"""One node with --workers 1 and again with --workers 2: requests/s, CPU per request (node plus
all its workers, from /proc), memory per worker, and how evenly the workers shared the load.

    .venv/bin/python bench/workers_bench.py [--duration 5] [--connections 50] [--threads 1]

Same origin, policy (bench/big_policy.py: 200 rules, 10,000 domains) and wrk script as
bench/proxy_bench.py; each layout gets a warm-up, then one measured run. The "spread" column is the
busiest worker's share of the requests (0.50 is perfectly even with two). Figures from a shared
machine vary run to run; the ratio of the two layouts in the same run is what to read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from big_policy import write_policy_file
from harness import BenchError, http_get, read_cpu_seconds, read_status_kib, start_node, start_origin
from proxy_bench import run_wrk, write_wrk_script


def health(node) -> dict:
    host, _, port = node.extra["portal"].rpartition(":")
    status, body = http_get(host.strip("[]"), int(port), "/health", 5.0)
    return json.loads(body)


def pids_of(node) -> list[int]:
    return [node.pid] + [w["pid"] for w in health(node).get("workers", []) if w.get("pid")]


def wait_all_running(node, count: int, timeout: float = 120.0) -> None:
    """/health is 200 once one worker accepts; the others may still be compiling the policy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = health(node).get("workers", [])
        if count == 1 or (len(workers) == count and all(w["state"] == "running" for w in workers)):
            return
        time.sleep(0.2)
    raise BenchError(f"not all {count} workers running after {timeout:g} s")


def measure(node, args, wrk: str, script: Path) -> dict:
    run_wrk(wrk, node, script, 1, args.connections, args.threads)  # warm-up
    pids = pids_of(node)
    before = {pid: read_cpu_seconds(pid) for pid in pids}
    counts_before = {w["pid"]: w["requests"] for w in health(node).get("workers", [])}
    result = run_wrk(wrk, node, script, args.duration, args.connections, args.threads)
    cpu = sum(read_cpu_seconds(pid) - before[pid] for pid in pids)
    workers = health(node).get("workers", [])
    share = None
    if workers:
        done = [w["requests"] - counts_before.get(w["pid"], 0) for w in workers]
        share = max(done) / max(1, sum(done))
    rss = {pid: read_status_kib(pid)["VmRSS"] for pid in pids}
    return {"rps": result.requests / result.seconds, "cpu_us": 1e6 * cpu / max(1, result.requests),
            "errors": result.socket_errors + result.non_2xx_3xx, "p99_ms": result.p99_ms,
            "share": share, "rss_mib": [round(v / 1024, 1) for v in rss.values()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        workdir = Path(tmp)
        origin = start_origin(workdir / "origin")
        policy = write_policy_file(200, 10000, directory=str(workdir))
        script = write_wrk_script(workdir, origin)
        rows = []
        try:
            for count in (1, 2):
                node = start_node(workdir / f"node-{count}", policy, ["--workers", str(count), "--stop-grace", "0"])
                try:
                    wait_all_running(node, count)
                    rows.append((count, measure(node, args, wrk, script)))
                finally:
                    node.stop()
        except BenchError as e:
            print(e, file=sys.stderr)
            return 1
        finally:
            origin.stop()
    print(f"{'workers':>7} {'req/s':>9} {'CPU us/req':>10} {'p99 ms':>7} {'errors':>6} {'spread':>6}  RSS MiB (node, workers)")
    for count, r in rows:
        spread = f"{r['share']:.2f}" if r["share"] is not None else "-"
        print(f"{count:>7} {r['rps']:>9.0f} {r['cpu_us']:>10.0f} {r['p99_ms']:>7.1f} {r['errors']:>6} {spread:>6}  {r['rss_mib']}")
    print(f"ratio 2 workers / 1: {rows[1][1]['rps'] / rows[0][1]['rps']:.2f}")
    return 1 if any(r["errors"] for _c, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
