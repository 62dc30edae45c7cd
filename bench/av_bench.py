"""Anti-virus scanning cost: downloads through a node with scanning off, on (c-icap + ClamAV), and
answered from the clean-verdict cache, all in one run.

Starts clamd and c-icap (as the test suite does: an offline EICAR signature, temporary directory),
an origin serving 100 KiB and 5 MiB objects, and three standalone nodes:

- ``off``: no `antivirus` section;
- ``on``: scanning with the clean-verdict cache off (every download goes to c-icap);
- ``cached``: scanning with the cache on, warmed once (every download is a cache hit).

For each size and mode it prints requests/s (sequential, one client, and 4 concurrent clients),
the median latency per object and what scanning adds to it, and the node's CPU seconds per request
(read from /proc: steadier than rates on a busy machine). Then the node's peak RSS while 50
clients download 5 MiB objects at once, with scanning off and on.

    .venv/bin/python bench/av_bench.py [--small-requests 40] [--large-requests 6] [--keep]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "tests" / "integration"))  # icap_servers (after bench/: both have a harness.py)

from harness import ProcessSampler, read_cpu_seconds, start_node  # noqa: E402
from icap_servers import Scanners, missing_tools  # noqa: E402

SMALL = 100 * 1024
LARGE = 5 * 1024 * 1024


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bodies: dict[int, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        size = int(self.path.rsplit("/", 1)[-1].split("?")[0])
        body = self.bodies[size]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _pseudo_random(size: int) -> bytes:
    import hashlib
    block = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(2048))  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def start_origin() -> ThreadingHTTPServer:
    _Origin.bodies = {SMALL: _pseudo_random(SMALL), LARGE: _pseudo_random(LARGE)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def fetch(node, url: str, expect: int, timeout: float = 120.0) -> float:
    """One GET through the node on a fresh connection; its wall time."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(node.host, node.port, timeout=timeout)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or len(body) != expect:
        raise RuntimeError(f"{url}: {response.status}, {len(body)} bytes")
    return time.monotonic() - started


def measure(nodes: dict, url: str, size: int, requests: int) -> dict:
    """Sequential requests, interleaved across the modes (a busy machine's drift hits all alike),
    then 4 concurrent clients per mode."""
    for node in nodes.values():
        fetch(node, url, size)  # connection set-up, OPTIONS, cache warm-up
    times: dict[str, list[float]] = {name: [] for name in nodes}
    cpu: dict[str, float] = {name: 0.0 for name in nodes}
    for _ in range(requests):
        for name, node in nodes.items():
            cpu0 = read_cpu_seconds(node.pid)
            times[name].append(fetch(node, url, size))
            cpu[name] += read_cpu_seconds(node.pid) - cpu0
    out = {}
    for name, node in nodes.items():
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: fetch(node, url, size), range(requests)))
        concurrent_rate = requests / (time.monotonic() - started)
        ordered = sorted(times[name])
        median = ordered[len(ordered) // 2]
        out[name] = {"latency_ms": median * 1000, "rate_seq": 1 / (sum(ordered) / len(ordered)),
                     "rate_4": concurrent_rate, "cpu_ms": cpu[name] / requests * 1000}
    return out


def memory_under_load(node, url: str, clients: int = 50) -> dict:
    sampler = ProcessSampler(node.pid, interval=0.05).start()
    base = sampler.max_rss_kib
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: fetch(node, url, LARGE, timeout=300), range(clients)))
    sampler.stop()
    return {"rss_before_mib": base / 1024, "peak_rss_mib": sampler.max_rss_kib / 1024}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-requests", type=int, default=40)
    parser.add_argument("--large-requests", type=int, default=6)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    problem = missing_tools()
    if problem:
        print(f"cannot run: {problem}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="av-bench-"))
    nodes = {}
    scanners = origin = None
    ok = False
    try:
        scanners = Scanners(work / "scanners").start()
        origin = start_origin()
        base = f"http://127.0.0.1:{origin.server_address[1]}/obj"
        av = {"enabled": True, "icap_services": [scanners.url], "max_scan_bytes": 64 * 1048576}
        policies = {
            "off": {},
            "on": {"antivirus": {**av, "verdict_cache_seconds": 0}},
            "cached": {"antivirus": av},
        }
        for name, sections in policies.items():
            path = work / f"{name}-policy.json"
            path.write_text(json.dumps({"format": "safesquid-policy/1",
                                        "access": {"default_action": "allow", "rules": []}, **sections}))
            nodes[name] = start_node(work / name, str(path))
        time.sleep(1.0)  # the scanning nodes' first EICAR self-test
        results = {}
        for size, requests in ((SMALL, args.small_requests), (LARGE, args.large_requests)):
            for name, figures in measure(nodes, f"{base}/{size}", size, requests).items():
                results[(size, name)] = figures
        print("Anti-virus bench (figures taken on a shared, loaded machine: compare within this run only)")
        print(f"{'object':>8} {'mode':>7} {'req/s seq':>10} {'req/s x4':>9} {'median ms':>10} {'added ms':>9} {'node CPU ms/req':>16}")
        for size in (SMALL, LARGE):
            off = results[(size, "off")]["latency_ms"]
            for name in nodes:
                r = results[(size, name)]
                label = "100 KiB" if size == SMALL else "5 MiB"
                print(f"{label:>8} {name:>7} {r['rate_seq']:10.1f} {r['rate_4']:9.1f} {r['latency_ms']:10.1f} "
                      f"{r['latency_ms'] - off:9.1f} {r['cpu_ms']:16.1f}")
        print(f"\nNode memory with {args.clients} concurrent 5 MiB downloads:")
        for name in ("off", "on"):
            m = memory_under_load(nodes[name], f"{base}/{LARGE}", args.clients)
            print(f"  scanning {name:>3}: RSS before {m['rss_before_mib']:.1f} MiB, peak {m['peak_rss_mib']:.1f} MiB")
        for name in ("on", "cached"):
            conn = http.client.HTTPConnection(*nodes[name].extra["portal"].rsplit(":", 1), timeout=5)
            conn.request("GET", "/health")
            stats = json.loads(conn.getresponse().read())["antivirus"]
            print(f"  {name}: scans {stats['scans']}, cache hits {stats['cache_hits']}, "
                  f"last ICAP latency {stats['services'][0]['latency_ms']} ms")
        ok = True
    finally:
        for node in nodes.values():
            node.stop()
        if origin is not None:
            origin.shutdown()
        if scanners is not None:
            scanners.stop()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"files kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
