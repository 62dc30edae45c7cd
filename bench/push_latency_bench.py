"""Proxy latency while a big policy is pushed again and again, and the push latency to 3 slaves.

    .venv/bin/python bench/push_latency_bench.py [--rules 1000] [--domains 100000] [--slaves 3]
                                                 [--phase 8] [--rounds 2] [--rate 50] [--samples FILE]

Starts a local origin (nginx), a master loaded with the `bench/big_policy.py` policy (1000 rules,
100,000 domains by default) and `--slaves` slaves, all real `twistd` processes on loopback. A paced
client (`--rate` requests per second on one keep-alive connection, so a stall shows as latency and
not as lost throughput) sends requests through the first slave's proxy, alternating phases of
`--phase` seconds: quiet (no pushes), then pushes (a new version of the big policy applied through
the master's API, `POST /api/v1/policy`, as soon as every slave runs the previous one), `--rounds`
times. Everything is measured in the same run.

Prints p50/p99/max proxy latency in each kind of phase and the ratio p99(pushes)/p99(quiet)
(target: at most 2), and the push latency: from the API call until every slave's /health shows the
new version (min/median/max over the pushes), with the master's own figure of its apply time.
"""

from __future__ import annotations

import argparse
import os
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import importlib.util

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR.parent / "tests" / "integration"))  # its own `harness` module
sys.path.insert(0, str(BENCH_DIR))


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build_policy = _bench_module("big_policy").build_policy
_bench_harness = _bench_module("harness")
SMALL_PATH, start_origin = _bench_harness.SMALL_PATH, _bench_harness.start_origin
sys.path.remove(str(BENCH_DIR))

import cluster_harness  # noqa: E402  (tests/integration: real master and slaves on loopback)


class PacedClient(threading.Thread):
    """GETs the small file through the proxy at a fixed rate on one keep-alive connection and
    records (send time, latency) for each answer."""

    def __init__(self, proxy: tuple[str, int], origin_port: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.request = (f"GET http://127.0.0.1:{origin_port}{SMALL_PATH} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{origin_port}\r\n\r\n").encode()
        self.interval = 1.0 / rate
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self.stopping = threading.Event()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.proxy, timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _one(self, sock: socket.socket) -> None:
        sock.sendall(self.request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            rest += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head[:40])

    def run(self) -> None:
        sock = self._connect()
        next_at = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            start = time.monotonic()
            try:
                self._one(sock)
            except (OSError, ConnectionError):
                self.errors += 1
                sock.close()
                sock = self._connect()
                continue
            self.samples.append((start, time.monotonic() - start))
            next_at = max(next_at + self.interval, time.monotonic())
        sock.close()


def _run_paced(proxy, origin_port: int, rate: float, stopping, results) -> None:
    client = PacedClient(proxy, origin_port, rate)
    client.stopping = stopping
    client.run()
    results.send((client.samples, client.errors))


class PacedClientProcess:
    """The paced client in a process of its own (the default): in the bench's process it waits
    for the GIL whenever the pushing thread holds it (a 3 MB body, the cluster view decoded), and
    that wait would be counted as the proxy's latency."""

    def __init__(self, proxy: tuple[str, int], origin_port: int, rate: float) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self._results, child_end = context.Pipe(duplex=False)
        self.stopping = context.Event()
        self._process = context.Process(target=_run_paced, args=(proxy, origin_port, rate, self.stopping, child_end),
                                        daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.errors = 0

    def start(self) -> None:
        self._process.start()

    def join(self, timeout: float) -> None:
        if self._results.poll(timeout):
            self.samples, self.errors = self._results.recv()
        self._process.join(timeout)


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU seconds (user + system) one thread of a process has used, from /proc."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a whole process, every thread, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The process's direct children (a slave's workers), from /proc."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def node_processes(cluster, slaves) -> dict[str, int]:
    """name -> pid for the master, every slave's node process and each of its workers."""
    processes = {"master": cluster.master.pid}
    for slave in slaves:
        processes[slave.name] = slave.pid
        for n, child in enumerate(sorted(children_of(slave.pid))):
            processes[f"{slave.name}.worker{n + 1}"] = child
    return processes


def renice_others(processes: dict[str, int], measured: str, niceness: int) -> None:
    """Every thread of every process but `measured` and its workers at `niceness`.

    A real cluster runs its master and each slave on machines of their own; here they share two
    cores with the slave being measured, its client and its origin, and the version they all take
    at the same moment is work the measured slave would never wait for. Lowering their priority
    (each thread: Linux keeps niceness per thread) is the nearest this one machine gets to that.
    """
    for name, pid in processes.items():
        if name == measured or name.startswith(measured + "."):
            continue
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)
            except (ProcessLookupError, PermissionError) as e:
                print(f"could not renice {name} thread {task.name}: {e}", flush=True)
    print(f"every process but {measured}'s at niceness {niceness}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def wait_versions(cluster, names: list[str], version: int, timeout: float) -> float | None:
    """When the master's cluster view shows every slave acknowledging `version` (asking the
    master, not the slaves, so that the watching adds no load to the proxy being measured)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            nodes = {entry["name"]: entry for entry in cluster.cluster_view()["nodes"]}
        except (OSError, cluster_harness.HarnessError):
            nodes = {}
        if all(nodes.get(name, {}).get("policy_version") == version for name in names):
            return time.monotonic()
        time.sleep(0.02)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--domains", type=int, default=100000)
    parser.add_argument("--slaves", type=int, default=3)
    parser.add_argument("--phase", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=50.0, help="client requests per second")
    parser.add_argument("--push-interval", type=float, default=0.0, metavar="S",
                        help="start a push at most every S seconds (default 0: each as soon as the last "
                             "reached every slave, about ten a second)")
    parser.add_argument("--worst", type=int, default=0, help="list this many of the slowest answers")
    parser.add_argument("--samples", metavar="FILE",
                        help="write every answer (wall-clock send time, latency) and push time as JSON, to "
                             "place stalls beside other processes' logs")
    parser.add_argument("--others-niced", type=int, default=0, metavar="N",
                        help="run the master and every slave but slave1 (with their workers and threads) at "
                             "niceness N: on this one machine, the stand-in for the other machines a real "
                             "cluster runs them on (default 0: all at the same priority)")
    parser.add_argument("--client-thread", action="store_true",
                        help="run the paced client as a thread of the bench (as before) instead of a process")
    args = parser.parse_args(argv)
    # The paced client is a thread of this process: each answer it waits for comes back through
    # a system call after which it needs this process's GIL, held meanwhile by the thread that
    # pushes (3 MB bodies, polling the cluster view). The default 5 ms switch interval would add
    # the bench's own waits to the proxy's latency.
    sys.setswitchinterval(0.0002)

    base = build_policy(args.rules, args.domains)
    workdir = Path(tempfile.mkdtemp(prefix="push-bench-"))
    origin = start_origin(workdir / "origin")
    cluster = cluster_harness.Cluster(workdir)
    try:
        print(f"policy: {args.rules} rules, {args.domains} domains, "
              f"{len(json.dumps(base)) / 1e6:.1f} MB as JSON; {args.slaves} slaves", flush=True)
        cluster.start_master(base, keepalive=2.0)
        slaves = cluster.add_slaves(args.slaves, timeout=120)
        for slave in slaves:
            slave.wait_health(200, 120, check=lambda body: body["policy_version"] == 1)
        # The request body is serialised once: json.dumps of 3 MB holds this process's GIL for
        # 60-100 ms, and the paced client measuring the proxy is a thread of this process.
        placeholder = b"@@bench-comment@@"
        request_template = json.dumps({"document": dict(base, comment=placeholder.decode())}).encode()
        paced = PacedClient if args.client_thread else PacedClientProcess
        client = paced(slaves[0].proxy, origin.port, args.rate)
        client.start()
        time.sleep(1.0)  # warm the connection pool
        phases: list[tuple[str, float, float]] = []
        pid = slaves[0].pid
        reactor_cpu = {"quiet": 0.0, "pushes": 0.0}
        phase_time = {"quiet": 0.0, "pushes": 0.0}
        pushes: list[float] = []
        push_times: list[float] = []  # when each push was sent, to place the slowest answers
        version = 1
        processes = node_processes(cluster, slaves)
        if args.others_niced:
            renice_others(processes, "slave1", args.others_niced)
        push_cpu = {name: 0.0 for name in processes}
        for _round in range(args.rounds):
            start, cpu = time.monotonic(), thread_cpu_seconds(pid, pid)
            time.sleep(args.phase)
            phases.append(("quiet", start, time.monotonic()))
            reactor_cpu["quiet"] += thread_cpu_seconds(pid, pid) - cpu
            phase_time["quiet"] += time.monotonic() - start
            start, cpu = time.monotonic(), thread_cpu_seconds(pid, pid)
            cpu_before = {name: process_cpu_seconds(p) for name, p in processes.items()}
            while time.monotonic() - start < args.phase:
                data = request_template.replace(placeholder, f"bench push {version + 1}".encode(), 1)
                sent = time.monotonic()
                push_times.append(sent)
                status, body = post_policy(cluster, data)
                if status not in (200, 201):
                    print(f"push refused: {status} {body}", flush=True)
                    return 1
                version = body["version"]
                reached = wait_versions(cluster, [s.name for s in slaves], version, 60)
                if reached is None:
                    print(f"version {version} did not reach every slave within 60 s", flush=True)
                    return 1
                pushes.append(reached - sent)
                pause = sent + args.push_interval - time.monotonic()
                if pause > 0:  # the next push on time, or none in this phase
                    time.sleep(max(0.0, min(pause, start + args.phase - time.monotonic())))
            phases.append(("pushes", start, time.monotonic()))
            for name, p in processes.items():
                push_cpu[name] += process_cpu_seconds(p) - cpu_before[name]
            reactor_cpu["pushes"] += thread_cpu_seconds(pid, pid) - cpu
            phase_time["pushes"] += time.monotonic() - start
        client.stopping.set()
        client.join(15)
        by_kind: dict[str, list[float]] = {"quiet": [], "pushes": []}
        for kind, begin, end in phases:
            by_kind[kind] += [lat for at, lat in client.samples if begin <= at < end]
        print("proxy latency through slave1 (ms), paced at %.0f req/s:" % args.rate)
        for kind, values in by_kind.items():
            if not values:
                print(f"  {kind:7s} no samples")
                continue
            print(f"  {kind:7s} n={len(values):5d}  p50={percentile(values, .5) * 1e3:7.2f}  "
                  f"p99={percentile(values, .99) * 1e3:7.2f}  max={max(values) * 1e3:7.2f}")
        print("  slave1's reactor thread CPU: quiet %.0f%%, pushes %.0f%% of a core (its policy worker thread "
              "is not counted)" % tuple(100 * reactor_cpu[k] / phase_time[k] for k in ("quiet", "pushes")))
        if args.worst:
            print(f"  the {args.worst} slowest answers (ms), placed after the push sent before them:")
            for at, lat in sorted(client.samples, key=lambda s: -s[1])[:args.worst]:
                before = [t for t in push_times if t <= at]
                where = f"{at - before[-1]:6.2f} s after push {len(before)}" if before else "before any push"
                print(f"    {lat * 1e3:8.2f} ms, sent {where}")
        if args.samples:
            # CLOCK_MONOTONIC is the same in every process: one offset turns it into wall time.
            to_wall = time.time() - time.monotonic()
            Path(args.samples).write_text(json.dumps({
                "monotonic_to_wall": to_wall,
                "answers": [(at + to_wall, lat) for at, lat in client.samples],
                "pushes": [at + to_wall for at in push_times],
                "phases": [(kind, begin + to_wall, end + to_wall) for kind, begin, end in phases]}))
        p99_quiet = percentile(by_kind["quiet"], .99)
        p99_push = percentile(by_kind["pushes"], .99)
        print(f"  p99 ratio pushes/quiet = {p99_push / p99_quiet:.2f} (target <= 2.0); client errors: {client.errors}")
        if pushes:
            print(f"push latency to {args.slaves} slaves (API call -> the master has every slave's acknowledgement), "
                  f"{len(pushes)} pushes: min {min(pushes):.2f} s, median {statistics.median(pushes):.2f} s, "
                  f"max {max(pushes):.2f} s")
        if pushes:
            # The steadier figure on a shared machine: CPU per version, whole processes, read from
            # /proc over the pushes phases (quiet-phase traffic of the measured slave included).
            per = {name: cpu / len(pushes) for name, cpu in push_cpu.items()}
            print(f"CPU seconds per version per process (pushes phases / {len(pushes)} versions): "
                  + ", ".join(f"{name} {value:.3f}" for name, value in per.items())
                  + f"; all {sum(per.values()):.2f}")
        text = _metrics_text(cluster)
        for line in text.splitlines():
            if line.startswith(("safesquid_policy_last_apply", "safesquid_policy_push_latency_seconds")):
                print("  master metric:", line)
        print("(figures from a shared 2-core machine under other load: compare ratios, not absolutes)")
        return 0
    finally:
        cluster.stop_all()
        origin.stop()


def post_policy(cluster, data: bytes) -> tuple[int, dict]:
    """POST /api/v1/policy with a body already serialised (see main)."""
    import http.client

    conn = http.client.HTTPConnection(cluster_harness.MASTER_HOST, cluster.master_port, timeout=60)
    try:
        conn.request("POST", "/api/v1/policy", body=data, headers={
            "Authorization": f"Bearer {cluster._token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _metrics_text(cluster) -> str:
    import http.client

    conn = http.client.HTTPConnection(cluster_harness.MASTER_HOST, cluster.master_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    except OSError:
        return ""
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
