"""Requests per second and latency of safesquid-tw against twisted.web.proxy, through wrk.

    .venv/bin/python bench/proxy_bench.py [--duration 15] [--rounds 1] [--connections 50] [--threads 2]

Starts a local origin (nginx serving a ~100-byte file with keep-alive; a Twisted origin when nginx
is not installed), the reference proxy (bench/reference_proxy.py) as it comes and again with
--keep-alive, and a standalone node loaded with the 200-rule, 10,000-domain policy of
bench/big_policy.py (no rule blocks the benchmark URL). Each proxy gets a warm-up, then measured
wrk runs of absolute-form requests (`GET http://127.0.0.1:PORT/small HTTP/1.1`) on keep-alive
connections, references first, ours last, one proxy at a time. With --rounds N the sequence is
repeated N times and each proxy's best round is shown (other load on the machine only ever slows a
run down); the "others" column is the CPU that processes outside the benchmark used meanwhile.

Prints requests/s, p50 and p99 latency, socket errors and non-2xx/3xx answers (a proxy that fails
fast must not look fast), the proxy's RSS and CPU use, and the ratio ours/reference (target: at
least 1.5x requests/s). Exits 1 when a proxy gave errors or could not be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
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
    machine_busy_seconds,
    read_cpu_seconds,
    start_node,
    start_origin,
    start_reference_proxy,
)

TARGET_RATIO = 1.5
REFERENCE = "reference"
REFERENCE_KEEP_ALIVE = "reference-ka"
OURS = "safesquid-tw"
BASELINE = "baseline"
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
    """One measured wrk run through one proxy."""

    name: str
    wrk: WrkResult
    max_rss_kib: int
    hwm_kib: int
    cpu_percent: float
    others_cpu_percent: float  # CPU used by processes outside the benchmark, % of one core


@dataclass(frozen=True)
class Summary:
    """A proxy's best round, with the errors and memory of all its rounds."""

    best: Measurement
    rounds_rps: list[float]
    socket_errors: int
    non_2xx_3xx: int
    max_rss_kib: int
    hwm_kib: int

    @property
    def clean(self) -> bool:
        return self.socket_errors == 0 and self.non_2xx_3xx == 0 and self.best.wrk.requests > 0


def summarize(runs: list[Measurement]) -> Summary:
    return Summary(
        best=max(runs, key=lambda m: m.wrk.requests_per_second),
        rounds_rps=[m.wrk.requests_per_second for m in runs],
        socket_errors=sum(m.wrk.socket_errors for m in runs),
        non_2xx_3xx=sum(m.wrk.non_2xx_3xx for m in runs),
        max_rss_kib=max(m.max_rss_kib for m in runs),
        hwm_kib=max(m.hwm_kib for m in runs),
    )


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


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(proxy: Running, origin: Running, args: argparse.Namespace, wrk: str, script: Path) -> Measurement:
    """One measured run; the machine's CPU not used by proxy, origin or wrk is counted as others'."""
    sampler = ProcessSampler(proxy.pid).start()
    origin_cpu, wrk_cpu, machine = read_cpu_seconds(origin.pid), _children_cpu_seconds(), machine_busy_seconds()
    try:
        result = run_wrk(wrk, proxy, script, args.duration, args.connections, args.threads)
    finally:
        sampler.stop()
    ours = _children_cpu_seconds() - wrk_cpu + sampler.cpu_seconds
    if origin is not proxy:
        ours += read_cpu_seconds(origin.pid) - origin_cpu
    others = max(0.0, machine_busy_seconds() - machine - ours)
    if args.verbose:
        print(result.text)
    return Measurement(proxy.name, result, sampler.max_rss_kib, sampler.hwm_kib, sampler.cpu_percent,
                       100.0 * others / sampler.wall_seconds if sampler.wall_seconds else 0.0)


def format_table(summaries: list[Summary]) -> str:
    header = (f"{'proxy':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'non-2xx':>9}"
              f"{'RSS MiB':>9}{'peak MiB':>10}{'CPU %':>7}{'others %':>10}  rounds req/s")
    lines = [header, "-" * len(header)]
    for s in summaries:
        w = s.best.wrk
        lines.append(
            f"{s.best.name:<14}{w.requests_per_second:>9.0f}{w.p50_ms:>9.2f}{w.p99_ms:>9.2f}{s.socket_errors:>8}"
            f"{s.non_2xx_3xx:>9}{s.max_rss_kib / 1024:>9.1f}{s.hwm_kib / 1024:>10.1f}{s.best.cpu_percent:>7.0f}"
            f"{s.best.others_cpu_percent:>10.0f}  {' '.join(f'{r:.0f}' for r in s.rounds_rps)}"
        )
    return "\n".join(lines)


def verdict(reference: Summary, ours: Summary) -> str:
    """The ratio of ours to one reference, unless an error makes the ratio meaningless."""
    if not (reference.clean and ours.clean):
        return "ratio not meaningful: a proxy answered with errors or non-2xx/3xx (see the table)"
    ratio = ours.best.wrk.requests_per_second / reference.best.wrk.requests_per_second
    met = "met" if ratio >= TARGET_RATIO else "NOT met"
    p99 = ours.best.wrk.p99_ms / reference.best.wrk.p99_ms if reference.best.wrk.p99_ms else float("nan")
    return f"ours/reference {ratio:.2f}x requests/s (target >= {TARGET_RATIO}x: {met}); p99 latency {p99:.2f}x"


def cpu_us_per_request(m: Measurement) -> float:
    """The proxy process's CPU time per request (from /proc), steadier than rates on a busy machine."""
    rps = m.wrk.requests_per_second
    return m.cpu_percent / 100.0 / rps * 1e6 if rps else float("nan")


def baseline_verdict(baseline: Summary, ours: Summary) -> str:
    """Ours against the same node built from another checkout: requests/s and CPU per request."""
    if not (baseline.clean and ours.clean):
        return "ratio not meaningful: a node answered with errors or non-2xx/3xx (see the table)"
    rps = ours.best.wrk.requests_per_second / baseline.best.wrk.requests_per_second
    cpu_ours, cpu_base = cpu_us_per_request(ours.best), cpu_us_per_request(baseline.best)
    return (f"ours/baseline {rps:.3f}x requests/s; CPU per request {cpu_ours:.0f} us vs {cpu_base:.0f} us "
            f"({cpu_ours / cpu_base:.3f}x)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each measured run (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before the first run (default 3)")
    parser.add_argument("--rounds", type=int, default=1, help="times to measure each proxy; the best is shown")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rules", type=int, default=200, help="rules in the node's policy")
    parser.add_argument("--domains", type=int, default=10000, help="category domains in the node's policy")
    parser.add_argument("--only", choices=["reference", "ours"], help="measure one proxy only")
    parser.add_argument("--stock-reference-only", action="store_true",
                        help="skip the reference with --keep-alive (the stock one is always measured)")
    parser.add_argument("--direct", action="store_true", help="also measure the origin without a proxy (the ceiling)")
    parser.add_argument("--twisted-origin", action="store_true", help="use the Twisted origin even if nginx is installed")
    parser.add_argument("--node-args", default="",
                        help="extra options for the node, e.g. \"--upstream-idle-per-host 64\"")
    parser.add_argument("--twistd", help="twistd to run the node with (default: beside this Python)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, policy)")
    parser.add_argument("--verbose", action="store_true", help="print wrk's own output too")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure a node running the code of another checkout (e.g. `git archive BASE | "
                             "tar -x -C DIR`), in turn with ours, and print ours/baseline: no-regression checks")
    return parser.parse_args(argv)


def start_proxies(args: argparse.Namespace, workdir: Path, origin: Running, started: list[Running],
                  problems: list[str]) -> list[Running]:
    """The proxies to measure, in run order, each checked to fetch the small file correctly.

    A proxy that fails to start or to fetch the file is left out and its problem recorded, so the
    others are still measured.
    """
    candidates: list[Running] = [origin] if args.direct else []
    if args.only in (None, "reference"):
        for keep_alive in [False] if args.stock_reference_only else [False, True]:
            reference = start_reference_proxy(workdir / "reference", keep_alive=keep_alive)
            reference.name = REFERENCE_KEEP_ALIVE if keep_alive else REFERENCE
            started.append(reference)
            candidates.append(reference)
    if args.only in (None, "ours"):
        policy = write_policy_file(args.rules, args.domains, directory=str(workdir))
        print(f"starting the node with {args.rules} rules and {args.domains} category domains ...", flush=True)
        if args.baseline:
            try:
                baseline = start_node(workdir / "baseline-state", policy, shlex.split(args.node_args), twistd=args.twistd,
                                      source_root=Path(args.baseline).resolve(), name=BASELINE)
            except BenchError as e:
                problems.append(f"{BASELINE} did not start: {e}")
            else:
                started.append(baseline)
                candidates.append(baseline)
        try:
            node = start_node(workdir / "node-state", policy, shlex.split(args.node_args), twistd=args.twistd)
        except BenchError as e:
            problems.append(f"{OURS} did not start: {e}")
        else:
            started.append(node)
            candidates.append(node)
    proxies = []
    for proxy in candidates:
        try:
            check_proxies_small_file(proxy, origin)
            proxies.append(proxy)
        except (BenchError, OSError) as e:
            problems.append(f"{proxy.name} cannot be measured: {e}")
    return proxies


def run(args: argparse.Namespace, wrk: str, workdir: Path, started: list[Running], problems: list[str]) -> list[Summary]:
    origin = start_origin(workdir / "origin", prefer_nginx=not args.twisted_origin)
    started.append(origin)
    if origin.name != "nginx":
        print("the origin is a Twisted web server (nginx not found or not wanted): it may limit every proxy")
    script = write_wrk_script(workdir, origin)
    print(f"origin {origin.name} at {origin.address}; wrk {args.threads} threads, {args.connections} connections, "
          f"{args.duration:g} s per run, {args.rounds} round(s); {os.cpu_count()} CPUs")
    proxies = start_proxies(args, workdir, origin, started, problems)
    for problem in problems:
        print(problem, file=sys.stderr)
    runs: dict[str, list[Measurement]] = {p.name: [] for p in proxies}
    for round_number in range(1, args.rounds + 1):
        # One proxy at a time, references first: an idle proxy costs the running one nothing.
        for proxy in proxies:
            if round_number == 1:
                run_wrk(wrk, proxy, script, args.warmup, args.connections, args.threads)
            m = measure(proxy, origin, args, wrk, script)
            runs[proxy.name].append(m)
            print(f"  round {round_number} {proxy.name:<14}{m.wrk.requests_per_second:>8.0f} req/s  "
                  f"{cpu_us_per_request(m):>5.0f} us CPU/req  "
                  f"errors {m.wrk.socket_errors}  non-2xx {m.wrk.non_2xx_3xx}  RSS {m.max_rss_kib / 1024:.0f} MiB  "
                  f"others' CPU {m.others_cpu_percent:.0f}%",
                  flush=True)
    return [summarize(r) for r in runs.values()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if not wrk:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    started: list[Running] = []
    summaries: list[Summary] = []
    problems: list[str] = []
    failed = False
    try:
        summaries = run(args, wrk, workdir, started, problems)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        failed = True
    finally:
        for process in reversed(started):
            process.stop()
        failed = failed or bool(problems) or any(not s.clean for s in summaries)
        if args.keep or failed:
            print(f"logs and policy kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if summaries:
        print()
        print(format_table(summaries))
        by_name = {s.best.name: s for s in summaries}
        if OURS in by_name:
            for name in (REFERENCE, REFERENCE_KEEP_ALIVE):
                if name in by_name:
                    print(f"vs {name}: {verdict(by_name[name], by_name[OURS])}")
            if BASELINE in by_name:
                print(f"vs {BASELINE}: {baseline_verdict(by_name[BASELINE], by_name[OURS])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
