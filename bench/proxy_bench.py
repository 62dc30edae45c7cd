"""Requests per second and latency of safesquid-tw against twisted.web.proxy, through wrk.

    .venv/bin/python bench/proxy_bench.py [--duration 15] [--connections 50] [--threads 2]

Starts a local origin (nginx serving a ~100-byte file with keep-alive; a Twisted origin when nginx
is not installed), the reference proxy (bench/reference_proxy.py) and a standalone node loaded with
the 200-rule, 10,000-domain policy of bench/big_policy.py (no rule blocks the benchmark URL). Each
proxy, reference first, gets a warm-up and then a measured wrk run of absolute-form requests
(`GET http://127.0.0.1:PORT/small HTTP/1.1`) on keep-alive connections. Prints requests/s, p50 and
p99 latency, errors and non-2xx/3xx answers (a proxy that fails fast must not look fast), the
proxy's peak RSS and CPU use, and the ratio ours/reference (target: at least 1.5x requests/s).
Exits 1 when a proxy gave errors or could not be measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from big_policy import write_policy_file
from harness import (
    SMALL_PATH,
    BenchError,
    ProcessSampler,
    Running,
    check_proxies_small_file,
    start_node,
    start_origin,
    start_reference_proxy,
)

TARGET_RATIO = 1.5
REFERENCE = "reference"
REFERENCE_KEEP_ALIVE = "reference-ka"
OURS = "safesquid-tw"
_RESULT_MARKER = "BENCH-RESULT "

# wrk sends origin-form requests; a forward proxy needs the absolute form. The request is built
# once: returning the same string from request() keeps wrk's Lua cost per request at a minimum.
# done() prints the figures as one JSON line, so nothing depends on wrk's human-readable units.
_WRK_SCRIPT = """
local url = "{url}"
wrk.headers["Host"] = "{host}"
local req = wrk.format("GET", url)
request = function()
  return req
end
done = function(summary, latency, requests)
  io.write(string.format(
    '{marker}{{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, summary.bytes,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    socket_errors: int  # connect + read + write + timeout
    non_2xx_3xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    text: str

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def clean(self) -> bool:
        return self.requests > 0 and self.socket_errors == 0 and self.non_2xx_3xx == 0


@dataclass(frozen=True)
class Measurement:
    name: str
    wrk: WrkResult
    max_rss_kib: int
    hwm_kib: int
    cpu_percent: float


def write_wrk_script(directory: Path, origin: Running) -> Path:
    script = directory / "absolute_form.lua"
    url = f"http://{origin.address}{SMALL_PATH}"
    script.write_text(_WRK_SCRIPT.format(url=url, host=origin.address, marker=_RESULT_MARKER), encoding="utf-8")
    return script


def parse_wrk_output(text: str) -> WrkResult:
    """The figures of one wrk run, from the JSON line our done() prints."""
    line = next((l for l in text.splitlines() if l.startswith(_RESULT_MARKER)), None)
    if line is None:
        raise BenchError(f"wrk printed no result line:\n{text}")
    r = json.loads(line[len(_RESULT_MARKER):])
    return WrkResult(
        requests=r["requests"],
        seconds=r["duration_us"] / 1e6,
        socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
        non_2xx_3xx=r["status"],
        p50_ms=r["p50_us"] / 1000,
        p90_ms=r["p90_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000,
        text=text,
    )


def run_wrk(wrk: str, proxy: Running, script: Path, seconds: float, connections: int, threads: int) -> WrkResult:
    command = [
        wrk, f"--threads={threads}", f"--connections={connections}", f"--duration={max(1, round(seconds))}s",
        "--timeout=5s", "--latency", f"--script={script}", f"http://{proxy.address}/",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk_output(done.stdout)


def measure(proxy: Running, origin: Running, args: argparse.Namespace, wrk: str, script: Path) -> Measurement:
    check_proxies_small_file(proxy, origin)
    print(f"  {proxy.name}: warm-up {args.warmup:g} s ...", flush=True)
    run_wrk(wrk, proxy, script, args.warmup, args.connections, args.threads)
    print(f"  {proxy.name}: measuring {args.duration:g} s ...", flush=True)
    sampler = ProcessSampler(proxy.pid).start()
    try:
        result = run_wrk(wrk, proxy, script, args.duration, args.connections, args.threads)
    finally:
        sampler.stop()
    if args.verbose:
        print(result.text)
    return Measurement(proxy.name, result, sampler.max_rss_kib, sampler.hwm_kib, sampler.cpu_percent)


def format_table(rows: list[Measurement]) -> str:
    header = f"{'proxy':<14}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'non-2xx':>9}{'RSS MiB':>9}{'peak MiB':>10}{'CPU %':>7}"
    lines = [header, "-" * len(header)]
    for m in rows:
        w = m.wrk
        lines.append(
            f"{m.name:<14}{w.requests_per_second:>10.0f}{w.p50_ms:>9.2f}{w.p99_ms:>9.2f}{w.socket_errors:>8}"
            f"{w.non_2xx_3xx:>9}{m.max_rss_kib / 1024:>9.1f}{m.hwm_kib / 1024:>10.1f}{m.cpu_percent:>7.0f}"
        )
    return "\n".join(lines)


def verdict(reference: Measurement, ours: Measurement) -> str:
    """The ratio of ours to one reference run, unless an error makes the ratio meaningless."""
    if not (reference.wrk.clean and ours.wrk.clean):
        return "ratio not meaningful: a proxy answered with errors or non-2xx/3xx (see the table)"
    ratio = ours.wrk.requests_per_second / reference.wrk.requests_per_second
    met = "met" if ratio >= TARGET_RATIO else "NOT met"
    p99 = ours.wrk.p99_ms / reference.wrk.p99_ms if reference.wrk.p99_ms else float("nan")
    return f"ours/reference {ratio:.2f}x requests/s (target >= {TARGET_RATIO}x: {met}); p99 latency {p99:.2f}x"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each measured run (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before each run (default 3)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rules", type=int, default=200, help="rules in the node's policy")
    parser.add_argument("--domains", type=int, default=10000, help="category domains in the node's policy")
    parser.add_argument("--only", choices=["reference", "ours"], help="measure one proxy only")
    parser.add_argument("--stock-reference-only", action="store_true",
                        help="skip the reference run with --keep-alive (the stock one is always measured)")
    parser.add_argument("--direct", action="store_true", help="also measure the origin without a proxy (the ceiling)")
    parser.add_argument("--twisted-origin", action="store_true", help="use the Twisted origin even if nginx is installed")
    parser.add_argument("--twistd", help="twistd to run the node with (default: beside this Python)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, policy)")
    parser.add_argument("--verbose", action="store_true", help="print wrk's own output too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if not wrk:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    started: list[Running] = []
    rows: list[Measurement] = []
    failed = False
    try:
        origin = start_origin(workdir / "origin", prefer_nginx=not args.twisted_origin)
        started.append(origin)
        if origin.name != "nginx":
            print("nginx not found: the origin is a Twisted web server, which may limit both proxies")
        script = write_wrk_script(workdir, origin)
        print(f"origin: {origin.name} at {origin.address}; wrk {args.threads} threads, {args.connections} connections, "
              f"{args.duration:g} s per run")
        if args.direct:
            rows.append(measure(origin, origin, args, wrk, script))
        # Reference first, then ours; each proxy runs alone so they never compete for the CPU.
        if args.only in (None, "reference"):
            variants = [False] if args.stock_reference_only else [False, True]
            for keep_alive in variants:
                reference = start_reference_proxy(workdir / "reference", keep_alive=keep_alive)
                reference.name = REFERENCE_KEEP_ALIVE if keep_alive else REFERENCE
                started.append(reference)
                rows.append(measure(reference, origin, args, wrk, script))
                reference.stop()
        if args.only in (None, "ours"):
            policy = write_policy_file(args.rules, args.domains, directory=str(workdir))
            print(f"  starting the node with {args.rules} rules and {args.domains} category domains ...", flush=True)
            node = start_node(workdir / "node-state", policy, twistd=args.twistd)
            started.append(node)
            try:
                rows.append(measure(node, origin, args, wrk, script))
            except BenchError as e:
                print(f"  safesquid-tw could not be measured: {e}\n{node.log_tail()}", file=sys.stderr)
                failed = True
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        failed = True
    finally:
        for process in reversed(started):
            process.stop()
        if args.keep or failed:
            print(f"logs and policy kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if rows:
        print()
        print(format_table(rows))
    failed = failed or any(not m.wrk.clean for m in rows)
    by_name = {m.name: m for m in rows}
    if OURS in by_name:
        for name in (REFERENCE, REFERENCE_KEEP_ALIVE):
            if name in by_name:
                print(f"{name}: {verdict(by_name[name], by_name[OURS])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
