"""Per-core speed of a node against proxy.py and Squid, measured in one run and the same layout.

    .venv/bin/python bench/percore_bench.py [--proxypy PATH-TO-proxy] [--duration 5]

Three proxies run in turn, one at a time, against one nginx origin on loopback:

* safesquid-tw: a standalone node (one process) with a 200-rule, 10k-domain policy;
* proxy.py (``pip install proxy.py`` into a separate virtualenv, given with ``--proxypy``), one
  worker, one acceptor;
* Squid (``squid`` from the distribution), one process (``-N``), no cache, no access log.

Each is measured in two layouts: ``pinned`` (every thread of the proxy on CPU 0, the load generator
and the origin on CPU 1) and ``free`` (nobody pinned). Three loads:

* ``small``: wrk, 50 keep-alive connections, a 100-byte file -> requests/s and the proxy's CPU time
  per request (user + system of the whole process tree, from /proc);
* ``connect``: CONNECT tunnels opened by 20 concurrent clients, each carrying one small request and
  closed -> tunnels/s and CPU per tunnel;
* ``big``: wrk, 10 keep-alive connections, a 1 MiB file -> MB/s and the proxy's peak RSS.

Rates depend on whatever else the machine is doing; CPU time per request does much less, so the
targets are read on it. The bench prints the CPU used by other processes meanwhile (``others``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from big_policy import build_policy  # noqa: E402
from harness import (  # noqa: E402
    BenchError, Running, check_proxies_small_file, free_port, machine_busy_seconds, start_node, start_origin,
    wait_until,
)
from proxy_bench import _RESULT_MARKER, _WRK_SCRIPT, parse_wrk_output  # noqa: E402

BIG_PATH = "/big"
BIG_SIZE = 1 << 20
PROXY_CPU, LOAD_CPU = 0, 1


# -- process trees ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                    found.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """`pid` and every descendant (proxy.py's workers, Squid's helpers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def tree_cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> float:
    """CPU time of a process's main thread only (the node's reactor thread)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of every process of the tree on `cpus` (threads made later inherit it)."""
    for p in tree(pid):
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    os.sched_setaffinity(int(tid), cpus)
                except OSError:
                    pass
        except OSError:
            pass


# -- the anchors --------------------------------------------------------------------------------


def start_proxypy(workdir: Path, proxy_bin: str) -> Running:
    port = free_port("127.0.0.4")
    log = workdir / "proxypy.log"
    command = [proxy_bin, "--hostname", "127.0.0.4", "--port", str(port), "--num-workers", "1",
               "--num-acceptors", "1", "--log-level", "ERROR", "--backlog", "1024"]
    with open(log, "wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    running = Running("proxy.py", popen, "127.0.0.4", port, log)
    wait_until(lambda: _accepts("127.0.0.4", port), 30, "proxy.py to listen", running)
    return running


_SQUID_CONF = """
http_port 127.0.0.3:{port}
workers 1
http_access allow all
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log {workdir}/cache.log
pid_filename {workdir}/squid.pid
coredump_dir {workdir}
cache_effective_user {user}
max_filedescriptors 16384
forwarded_for delete
via off
shutdown_lifetime 1 seconds
"""


def start_squid(workdir: Path) -> Running:
    squid = shutil.which("squid") or "/usr/sbin/squid"
    port = free_port("127.0.0.3")
    workdir.mkdir(parents=True, exist_ok=True)
    user = "proxy" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    if os.geteuid() == 0:
        shutil.chown(workdir, user)
    conf = workdir / "squid.conf"
    conf.write_text(_SQUID_CONF.format(port=port, workdir=workdir, user=user), encoding="utf-8")
    log = workdir / "squid.out"
    with open(log, "wb") as out:
        popen = subprocess.Popen([squid, "-N", "-f", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=workdir)
    running = Running("squid", popen, "127.0.0.3", port, workdir / "cache.log")
    wait_until(lambda: _accepts("127.0.0.3", port), 30, "squid to listen", running)
    return running


def _accepts(host: str, port: int) -> bool:
    import socket

    with socket.create_connection((host, port), timeout=1):
        return True


def bench_policy(origin: Running, rules: int, domains: int) -> dict:
    policy = build_policy(rules, domains)
    policy["connect"]["allowed_ports"] = [443, origin.port]  # the tunnels go to the origin's port
    return policy


def start_ours(workdir: Path, origin: Running, rules: int, domains: int, node_args: list[str],
               source_root: Path | None = None, slaves=None) -> Running:
    """A standalone node with the big policy (CONNECT also allowed to the origin's port), or a
    slave of `slaves` (a slave_layout.SlaveLayout, whose master has that policy);
    `source_root`: the code of another checkout, named "baseline"."""
    name = "baseline" if source_root is not None else "safesquid-tw"
    if slaves is not None:
        popen, host, port, log = slaves.slave(name, node_args, source_root)
        return Running(name, popen, host, port, log)
    policy = bench_policy(origin, rules, domains)
    path = workdir / "policy.json"
    path.write_text(json.dumps(policy), encoding="utf-8")
    if source_root is not None:
        return start_node(workdir / "baseline-state", str(path), node_args, source_root=source_root, name="baseline")
    return start_node(workdir / "node-state", str(path), node_args)


# -- loads --------------------------------------------------------------------------------------


@dataclass
class Figure:
    proxy: str
    layout: str
    load: str
    count: int  # requests or tunnels
    seconds: float
    cpu_seconds: float
    peak_rss_kib: int
    bytes: int
    errors: int
    others_percent: float
    main_thread_cpu_seconds: float = 0.0  # the node's reactor thread (its other threads: report store...)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.count * 1e6 if self.count else float("nan")

    @property
    def main_thread_cpu_us(self) -> float:
        return self.main_thread_cpu_seconds / self.count * 1e6 if self.count else float("nan")

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


def _wrk_script(workdir: Path, origin: Running, path: str) -> Path:
    script = workdir / f"wrk{path.replace('/', '_')}.lua"
    script.write_text(_WRK_SCRIPT.format(url=f"http://{origin.address}{path}", host=origin.address,
                                         marker=_RESULT_MARKER), encoding="utf-8")
    return script


def _load_prefix(layout: str) -> list[str]:
    return ["taskset", "-c", str(LOAD_CPU)] if layout == "pinned" else []


def run_wrk(proxy: Running, script: Path, layout: str, seconds: float, connections: int):
    command = [*_load_prefix(layout), "wrk", "--threads=1", f"--connections={connections}",
               f"--duration={max(1, round(seconds))}s", "--timeout=5s", f"--script={script}", f"http://{proxy.address}/"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed: {done.stderr or done.stdout}")
    return parse_wrk_output(done.stdout)


async def _tunnels(proxy: Running, origin: Running, seconds: float, concurrency: int) -> tuple[int, int]:
    connect = f"CONNECT {origin.address} HTTP/1.1\r\nHost: {origin.address}\r\n\r\n".encode()
    inner = f"GET /small HTTP/1.1\r\nHost: {origin.address}\r\nConnection: close\r\n\r\n".encode()
    deadline = time.monotonic() + seconds
    done = errors = 0

    async def one() -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                writer.write(connect)
                head = await reader.readuntil(b"\r\n\r\n")
                if b" 200" not in head.split(b"\r\n", 1)[0]:
                    raise BenchError(f"CONNECT answered {head[:60]!r}")
                writer.write(inner)
                body = await reader.read(-1)  # the origin closes after the answer
                if b" 200 " not in body[:20]:
                    raise BenchError(f"tunnelled GET answered {body[:60]!r}")
                writer.close()
                done += 1
            except (OSError, asyncio.IncompleteReadError, BenchError):
                errors += 1
                await asyncio.sleep(0.01)

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return done, errors


def _tunnel_main(argv: list[str]) -> int:
    host, port, ohost, oport, seconds, concurrency = argv
    done, errors = asyncio.run(_tunnels(Running("p", None, host, int(port)), Running("o", None, ohost, int(oport)),
                                        float(seconds), int(concurrency)))
    print(json.dumps({"tunnels": done, "errors": errors}))
    return 0


def run_tunnels(proxy: Running, origin: Running, layout: str, seconds: float, concurrency: int) -> tuple[int, int]:
    command = [*_load_prefix(layout), sys.executable, __file__, "--tunnel-client", proxy.host, str(proxy.port),
               origin.host, str(origin.port), str(seconds), str(concurrency)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"tunnel client failed: {done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["tunnels"], result["errors"]


def measure(proxy: Running, origin: Running, layout: str, load: str, args, scripts: dict[str, Path]) -> Figure:
    import threading

    peak = [tree_rss_kib(proxy.pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], tree_rss_kib(proxy.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    cpu0, machine0, t0 = tree_cpu_seconds(proxy.pid), machine_busy_seconds(), time.monotonic()
    main0 = thread_cpu_seconds(proxy.pid)
    own0 = tree_cpu_seconds(origin.pid) + _children_cpu()
    sampler.start()
    try:
        if load == "connect":
            count, errors = run_tunnels(proxy, origin, layout, args.duration, 20)
            nbytes, seconds = 0, None
        else:
            w = run_wrk(proxy, scripts[load], layout, args.duration, 50 if load == "small" else 10)
            count, errors, nbytes, seconds = w.requests, w.socket_errors + w.non_2xx_3xx, 0, w.seconds
            nbytes = count * (BIG_SIZE if load == "big" else 0)
    finally:
        stop.set()
        sampler.join()
    wall = time.monotonic() - t0
    cpu = tree_cpu_seconds(proxy.pid) - cpu0
    own = tree_cpu_seconds(origin.pid) + _children_cpu() - own0
    others = max(0.0, machine_busy_seconds() - machine0 - cpu - own)
    return Figure(proxy.name, layout, load, count, seconds or args.duration, cpu, peak[0], nbytes, errors,
                  100.0 * others / wall, thread_cpu_seconds(proxy.pid) - main0)


def _combined(a: Figure, b: Figure) -> Figure:
    """Two measurements of the same proxy and load as one (sums; the larger peak RSS)."""
    return Figure(a.proxy, a.layout, a.load, a.count + b.count, a.seconds + b.seconds, a.cpu_seconds + b.cpu_seconds,
                  max(a.peak_rss_kib, b.peak_rss_kib), a.bytes + b.bytes, a.errors + b.errors,
                  (a.others_percent + b.others_percent) / 2, a.main_thread_cpu_seconds + b.main_thread_cpu_seconds)


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the run ------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each measured run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per proxy and load")
    parser.add_argument("--proxypy", default=shutil.which("proxy") or "",
                        help="the `proxy` command of a proxy.py install (a separate virtualenv)")
    parser.add_argument("--no-squid", action="store_true")
    parser.add_argument("--layouts", default="pinned,free")
    parser.add_argument("--loads", default="small,connect,big")
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--domains", type=int, default=10000)
    parser.add_argument("--node-args", default="", help="extra options for the node")
    parser.add_argument("--role", choices=("standalone", "slave"), default="standalone",
                        help="measure a standalone node (its own report store in-process) or a slave "
                             "of a master started for the run (records shipped; the master unpinned, not measured)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure a node running another checkout's code (`git archive BASE | tar -x -C DIR`)")
    parser.add_argument("--no-anchors", action="store_true", help="measure the node(s) only (with --baseline)")
    return parser.parse_args(argv)


def start_all(args, workdir: Path, origin: Running, started: list[Running]) -> list[Running]:
    proxies = []
    slaves = None
    if args.role == "slave":
        from slave_layout import SlaveLayout

        slaves = SlaveLayout(workdir / "cluster", bench_policy(origin, args.rules, args.domains))
        started.append(Running("master", slaves.cluster.master.node.process, "127.0.0.1", 0))
    if args.baseline:
        base = start_ours(workdir, origin, args.rules, args.domains, args.node_args.split(), Path(args.baseline).resolve(),
                          slaves=slaves)
        started.append(base)
        proxies.append(base)
    node = start_ours(workdir, origin, args.rules, args.domains, args.node_args.split(), slaves=slaves)
    started.append(node)
    proxies.append(node)
    if args.no_anchors:
        pass
    elif args.proxypy:
        p = start_proxypy(workdir, args.proxypy)
        started.append(p)
        proxies.append(p)
    else:
        print("proxy.py not given (--proxypy): its anchor is left out", file=sys.stderr)
    if not args.no_squid and not args.no_anchors:
        s = start_squid(workdir / "squid")
        started.append(s)
        proxies.append(s)
    for p in proxies:
        check_proxies_small_file(p, origin)
    return proxies


def print_table(figures: list[Figure]) -> None:
    # "reactor us": the node's main thread only, i.e. without a standalone node's own report
    # store (the SQLite ingest of its records runs in worker threads; a slave ships them instead).
    print(f"\n{'layout':<7}{'load':<8}{'proxy':<14}{'rate/s':>9}{'CPU us':>9}{'reactor us':>11}{'MB/s':>8}"
          f"{'peak RSS MiB':>13}{'errors':>7}{'others %':>9}")
    for f in figures:
        mb = f"{f.mb_per_s:8.0f}" if f.load == "big" else f"{'':8}"
        main = f"{f.main_thread_cpu_us:>11.0f}" if f.proxy in ("safesquid-tw", "baseline") else f"{'':11}"
        print(f"{f.layout:<7}{f.load:<8}{f.proxy:<14}{f.rate:>9.0f}{f.cpu_us:>9.0f}{main}{mb}"
              f"{f.peak_rss_kib / 1024:>13.1f}{f.errors:>7}{f.others_percent:>9.0f}")


def print_ratios(figures: list[Figure]) -> None:
    by = {(f.layout, f.load, f.proxy): f for f in figures}
    ours = "safesquid-tw"
    print("\nratios (ours / anchor; CPU per request or tunnel: lower is better):")
    for layout in ("pinned", "free"):
        for load, anchor, what in (("small", "proxy.py", "rate"), ("small", "proxy.py", "cpu"),
                                   ("small", "squid", "rate"), ("small", "squid", "cpu"),
                                   ("connect", "squid", "cpu"), ("connect", "proxy.py", "cpu"),
                                   ("big", "squid", "mb"), ("big", "proxy.py", "mb"),
                                   ("small", "baseline", "cpu"), ("connect", "baseline", "cpu"),
                                   ("big", "baseline", "cpu"), ("big", "baseline", "mb")):
            a, o = by.get((layout, load, anchor)), by.get((layout, load, ours))
            if not (a and o):
                continue
            if what == "rate":
                target = "  (target >= 1.00)" if anchor == "proxy.py" and layout == "pinned" else ""
                print(f"  {layout:<7}{load:<8}requests/s vs {anchor:<9} {o.rate / a.rate:5.2f}x{target}")
            elif what == "cpu":
                target = ("  target <= 1.00" if (load, anchor) in (("small", "proxy.py"), ("connect", "squid")) else "")
                print(f"  {layout:<7}{load:<8}CPU per item vs {anchor:<7} {o.cpu_us / a.cpu_us:5.2f}x  "
                      f"({o.cpu_us:.0f} us vs {a.cpu_us:.0f} us){target}")
                if target or anchor == "baseline":
                    # The proxying alone, as on a slave: the report store's threads left out.
                    a_main = a.main_thread_cpu_us if anchor == "baseline" else a.cpu_us
                    print(f"  {layout:<7}{load:<8}reactor thread vs {anchor:<5} {o.main_thread_cpu_us / a_main:5.2f}x  "
                          f"({o.main_thread_cpu_us:.0f} us vs {a_main:.0f} us)")
            else:
                print(f"  {layout:<7}{load:<8}MB/s vs {anchor:<14} {o.mb_per_s / a.mb_per_s:5.2f}x  "
                      f"({o.mb_per_s:.0f} vs {a.mb_per_s:.0f}; peak RSS {o.peak_rss_kib / 1024:.0f} MiB "
                      f"vs {a.peak_rss_kib / 1024:.0f} MiB)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="percore-bench-"))
    started: list[Running] = []
    figures: list[Figure] = []
    failed = False
    try:
        origin = start_origin(workdir / "origin")
        started.append(origin)
        (workdir / "origin" / "www" / BIG_PATH.lstrip("/")).write_bytes(os.urandom(BIG_SIZE))
        scripts = {"small": _wrk_script(workdir, origin, "/small"), "big": _wrk_script(workdir, origin, BIG_PATH)}
        proxies = start_all(args, workdir, origin, started)
        print(f"{os.cpu_count()} CPUs, shared machine: read CPU per request, rates vary with others' load; "
              f"{args.duration:g} s per run")
        for layout in args.layouts.split(","):
            for p in [*proxies, origin]:
                pin(p.pid, {PROXY_CPU} if layout == "pinned" and p is not origin else
                    {LOAD_CPU} if layout == "pinned" else set(range(os.cpu_count() or 1)))
            for load in args.loads.split(","):
                # With a baseline the two nodes are measured twice, A B B A: whichever runs second
                # pays for what the first left behind (an A/A run with two copies of the same code
                # showed up to 9 % for the second one), and the order cancels out in the sums.
                order = [*proxies[:2], *proxies[1::-1], *proxies[2:]] if args.baseline else proxies
                measured: dict[str, Figure] = {}
                for p in order:
                    warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
                    measure(p, origin, layout, load, warm, scripts)
                    f = measure(p, origin, layout, load, args, scripts)
                    if p.name in measured:
                        figures.remove(measured[p.name])
                        f = _combined(measured[p.name], f)
                    measured[p.name] = f
                    figures.append(f)
                    reactor = (f" (reactor thread {f.main_thread_cpu_us:.0f} us)"
                               if p.name in ("safesquid-tw", "baseline") else "")
                    if f.seconds > args.duration * 1.5:
                        reactor += " [both runs]"
                    print(f"  {layout:<7}{load:<8}{p.name:<14}{f.rate:>8.0f}/s {f.cpu_us:>7.0f} us CPU each{reactor}"
                          f"  errors {f.errors}  others {f.others_percent:.0f}%", flush=True)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        failed = True
    finally:
        for p in reversed(started):
            p.stop()
        if args.keep or failed:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if figures:
        print_table(figures)
        print_ratios(figures)
    return 1 if failed or any(f.errors for f in figures) else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--tunnel-client":
        sys.exit(_tunnel_main(sys.argv[2:]))
    sys.exit(main())
