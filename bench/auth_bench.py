"""Proxy authentication against a directory: what it costs per request, warm and cold.

Starts a local origin, a real OpenLDAP slapd (the test suite's fixture) and three standalone
nodes on loopback: no authentication, directory users with a warm verdict cache, and directory
users with `cache_seconds: 0` (every request binds: the price of a new login). Prints requests/s
and the node's CPU time per request under wrk for the first two, and the latency of sequential
requests on one keep-alive connection for all three, as ratios against the no-authentication run
measured in the same invocation.

    python bench/auth_bench.py [--duration 5] [--connections 50]
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.append(str(BENCH_DIR.parent / "tests" / "integration"))  # after bench/: both have a harness.py

from harness import (  # noqa: E402
    SMALL_PATH, BenchError, Running, read_cpu_seconds, start_node, start_origin,
)
from directory_servers import GROUPS, Slapd  # noqa: E402

WRK_SCRIPT = """
local req = wrk.format("GET", "{url}", {{["Host"] = "{host}", ["Proxy-Authorization"] = "{auth}"}})
request = function() return req end
done = function(summary, latency, requests)
  io.write(string.format('RESULT {{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d}}\\n',
    summary.requests, summary.duration, summary.errors.status + summary.errors.read + summary.errors.connect,
    latency:percentile(50), latency:percentile(99)))
end
"""


def policy(directory: dict | None) -> dict:
    document = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []}}
    if directory is not None:
        document["authentication"] = {"enabled": True, "directory": directory}
        document["groups"] = [{"name": "engineering", "directory_groups": [f"cn=engineering,{GROUPS}"]}]
    return document


def credentials() -> str:
    return "Basic " + base64.b64encode(b"alice:alice-password").decode()


def wrk_run(node: Running, origin: Running, workdir: Path, duration: float, connections: int) -> dict:
    url = f"http://{origin.address}{SMALL_PATH}"
    script = workdir / f"auth-{node.port}.lua"
    script.write_text(WRK_SCRIPT.format(url=url, host=origin.address, auth=credentials()))
    import subprocess

    before = read_cpu_seconds(node.pid)
    done = subprocess.run(["wrk", "--threads=2", f"--connections={connections}", f"--duration={int(duration)}s",
                           "--script", str(script), f"http://{node.address}"], capture_output=True, text=True)
    cpu = read_cpu_seconds(node.pid) - before
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise BenchError(f"wrk printed no result: {done.stdout} {done.stderr}")
    result = json.loads(line[7:])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["cpu_us_per_request"] = cpu / max(1, result["requests"]) * 1e6
    return result


def sequential_latency_ms(node: Running, origin: Running, count: int) -> list[float]:
    request = (f"GET http://{origin.address}{SMALL_PATH} HTTP/1.1\r\nHost: {origin.address}\r\n"
               f"Proxy-Authorization: {credentials()}\r\n\r\n").encode()
    out = []
    with socket.create_connection((node.host, node.port)) as sock:
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"unexpected answer: {head[:200]!r}")
            length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
            while len(body) < length:
                body += sock.recv(65536)
            out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--sequential", type=int, default=500)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="auth-bench-"))
    origin = start_origin(work / "origin")
    slapd = Slapd(work / "slapd").start()
    nodes: dict[str, Running] = {}
    try:
        for name, directory in (("none", None), ("directory-warm", slapd.settings()),
                                ("directory-cold", slapd.settings(cache_seconds=0))):
            path = work / f"{name}.json"
            path.write_text(json.dumps(policy(directory)))
            nodes[name] = start_node(work / name, str(path))
        results = {}
        for name in ("none", "directory-warm"):
            results[name] = wrk_run(nodes[name], origin, work, args.duration, args.connections)
        latency = {name: sequential_latency_ms(node, origin, args.sequential) for name, node in nodes.items()}
        base = results["none"]
        print(f"{'run':16} {'req/s':>9} {'ratio':>6} {'CPU us/req':>11} {'p50 ms':>7} {'p99 ms':>7}")
        for name, r in results.items():
            print(f"{name:16} {r['rps']:9.0f} {r['rps'] / base['rps']:6.2f} {r['cpu_us_per_request']:11.1f} "
                  f"{r['p50_us'] / 1000:7.2f} {r['p99_us'] / 1000:7.2f}")
        print()
        print(f"sequential requests on one connection ({args.sequential} each):")
        none_median = statistics.median(latency["none"])
        for name, values in latency.items():
            median = statistics.median(values)
            p99 = sorted(values)[int(len(values) * 0.99) - 1]
            print(f"  {name:16} median {median:6.3f} ms  p99 {p99:6.3f} ms  added {median - none_median:+.3f} ms")
        print("\n(directory-cold binds to slapd on every request: its added latency is a new login's cost)")
    finally:
        for node in nodes.values():
            node.stop()
        slapd.stop()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
