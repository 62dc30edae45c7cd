"""Memory budget of a node under three floods, and whether another client keeps being served.

    .venv/bin/python bench/memory_budget.py [--silent 10000] [--heads 1000] [--flood-clients 20]
                                            [--phase-seconds 8] [--rss-bound-mb 512]

Starts a local origin, a 1xx-flooding origin and a standalone node (default limits except
--max-connections, raised above the number of sockets), then runs three phases in turn:

``1xx``
    `--flood-clients` clients each ask the flooding origin for a page; it answers with an endless
    stream of `103 Early Hints` responses (for `--phase-seconds`) before a final 200. A proxy that
    relays or buffers them all grows without bound; one that bounds informational responses per
    request answers 502 and closes.
``silent``
    `--silent` sockets connect and never send a byte, spread over loopback sources so the
    per-client limit (256 by default) admits them; the first-byte deadline (10 s by default)
    closes them.
``one-src``
    The same number of silent sockets from a single address: all but `--max-connections-per-client`
    (256) are closed at once.
``heads``
    `--heads` clients each send a request head just under the largest allowed size (64 KiB
    by default) without its final empty line, and hold it.

During every phase a probe client on its own source address (127.0.0.250) fetches a small file
through the proxy every 0.2 s. For each phase the script prints the node's RSS before and at its
peak, the probe's successes and slowest answer, and the verdict against `--rss-bound-mb`. Loopback
only; every socket is closed and every process stopped at the end, within a bounded time.
Figures depend on the machine and its load: read them against each other, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from big_policy import write_policy_file  # noqa: F401 - keeps the bench helpers importable together
from harness import BenchError, ProcessSampler, read_status_kib, small_file_request, start_node, start_origin
from idle_conns import IP_BIND_ADDRESS_NO_PORT, raise_fd_limit

PROBE_SOURCE = "127.0.0.250"
FLOOD_HOST = "127.0.0.1"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n" * 64


@dataclass
class Probe:
    ok: int = 0
    failed: int = 0
    slowest: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class PhaseResult:
    name: str
    detail: str
    rss_before_mb: float
    rss_peak_mb: float
    probe: Probe


async def _probe_once(proxy: tuple[str, int], request: bytes, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.bind((PROBE_SOURCE, 0))
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, proxy), timeout)
        await asyncio.wait_for(loop.sock_sendall(sock, request), timeout)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
            if not chunk:
                raise ConnectionError("closed before the response head")
            data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(data[:60].decode("latin-1"))
    finally:
        sock.close()


async def probe_loop(proxy: tuple[str, int], request: bytes, stop: asyncio.Event, probe: Probe) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            await _probe_once(proxy, request, 5.0)
            probe.ok += 1
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:
            probe.failed += 1
            if len(probe.errors) < 3:
                probe.errors.append(f"{type(e).__name__}: {e}")
        probe.slowest = max(probe.slowest, time.monotonic() - started)
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass


async def _connect(proxy: tuple[str, int], source: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, proxy), 10)
        return sock
    except BaseException:
        sock.close()
        raise


def sources(count: int, per_source: int, first: int = 10) -> list[str]:
    """Loopback sources for `count` sockets, at most `per_source` from each (under the per-client limit)."""
    needed = max(1, -(-count // per_source))
    if first + needed > 240:
        raise BenchError(f"{count} sockets at {per_source} per source need more loopback sources than there are")
    return [f"127.0.0.{first + i}" for i in range(needed)]


# -- the phases ------------------------------------------------------------------------------------

async def flood_origin(seconds: float) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                writer.write(EARLY_HINTS)
                await writer.drain()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, FLOOD_HOST, 0)


async def phase_1xx(proxy, clients: int, seconds: float) -> str:
    server = await flood_origin(seconds)
    port = server.sockets[0].getsockname()[1]
    request = (f"GET http://{FLOOD_HOST}:{port}/flood HTTP/1.1\r\nHost: {FLOOD_HOST}:{port}\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    received = [0]
    outcomes: dict[str, int] = {}

    async def one(index: int) -> None:
        sock = await _connect(proxy, f"127.0.0.{10 + index % 20}")
        try:
            await loop.sock_sendall(sock, request)
            if index % 2:
                # Half the clients never read: what the proxy does not pass on, it must not keep.
                await asyncio.sleep(seconds + 2)
                outcomes["not reading"] = outcomes.get("not reading", 0) + 1
                return
            first = b""
            end = time.monotonic() + seconds + 5
            while time.monotonic() < end:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), end - time.monotonic())
                if not chunk:
                    outcomes["closed"] = outcomes.get("closed", 0) + 1
                    break
                if not first:
                    first = chunk[:12]
                received[0] += len(chunk)
                if b"HTTP/1.1 502" in chunk or b"HTTP/1.1 200" in chunk:
                    key = "502" if b"HTTP/1.1 502" in chunk else "200"
                    outcomes[key] = outcomes.get(key, 0) + 1
                    break
            else:
                outcomes["still streaming 1xx"] = outcomes.get("still streaming 1xx", 0) + 1
        except (OSError, asyncio.TimeoutError):
            outcomes["no final answer in time"] = outcomes.get("no final answer in time", 0) + 1
        finally:
            sock.close()

    try:
        await asyncio.gather(*(one(i) for i in range(clients)))
    finally:
        server.close()
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())) or "no final answers"
    return f"{clients} clients; {received[0] / 1e6:.1f} MB of 1xx reached them; final answers {summary}"


async def phase_silent(proxy, count: int, per_source: int, seconds: float, first: int = 10) -> str:
    opened: list[socket.socket] = []
    failures = 0
    gate = asyncio.Semaphore(200)

    async def one(source: str) -> None:
        nonlocal failures
        async with gate:
            try:
                opened.append(await _connect(proxy, source))
            except (OSError, asyncio.TimeoutError):
                failures += 1

    addresses = sources(count, per_source, first)
    await asyncio.gather(*(one(addresses[i % len(addresses)]) for i in range(count)))
    await asyncio.sleep(seconds)  # from the last socket's connect
    still_open = 0
    for sock in opened:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        sock.close()
    return (f"{len(opened)} silent sockets from {len(addresses)} sources ({failures} failed to connect); "
            f"{still_open} still open {seconds:g} s after the last connected")


async def phase_heads(proxy, count: int, per_source: int, head_bytes: int, seconds: float) -> str:
    loop = asyncio.get_running_loop()
    opened: list[socket.socket] = []
    failures = 0
    gate = asyncio.Semaphore(100)
    line = b"GET http://127.0.0.1/big HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    filler = b"X-Fill: " + b"a" * 1000 + b"\r\n"
    head = line + filler * ((head_bytes - len(line) - 64) // len(filler))  # no final empty line

    async def one(source: str) -> None:
        nonlocal failures
        async with gate:
            try:
                sock = await _connect(proxy, source)
                opened.append(sock)
                await asyncio.wait_for(loop.sock_sendall(sock, head), 10)
            except (OSError, asyncio.TimeoutError):
                failures += 1

    addresses = sources(count, per_source)
    started = time.monotonic()
    await asyncio.gather(*(one(addresses[i % len(addresses)]) for i in range(count)))
    await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
    for sock in opened:
        sock.close()
    return f"{len(opened)} clients held a {len(head) // 1024} KiB unfinished head ({failures} failed)"


async def run_phase(name: str, node, probe_request: bytes, work) -> PhaseResult:
    proxy = (node.host, node.port)
    await asyncio.sleep(1.0)  # let the previous phase's sockets close
    before = read_status_kib(node.pid)["VmRSS"] / 1024
    sampler = ProcessSampler(node.pid, 0.1).start()
    probe, stop = Probe(), asyncio.Event()
    prober = asyncio.create_task(probe_loop(proxy, probe_request, stop, probe))
    try:
        detail = await work
    finally:
        stop.set()
        await prober
        sampler.stop()
    return PhaseResult(name, detail, before, sampler.max_rss_kib / 1024, probe)


async def main_async(args, node, origin) -> list[PhaseResult]:
    probe_request = small_file_request(origin)
    proxy = (node.host, node.port)
    return [
        await run_phase("1xx", node, probe_request, phase_1xx(proxy, args.flood_clients, args.phase_seconds)),
        # Held past the first-byte deadline, to see it close them.
        await run_phase("silent", node, probe_request,
                        phase_silent(proxy, args.silent, args.per_source,
                                     max(args.phase_seconds, args.first_byte_timeout + 2))),
        # The same flood from one address: the per-client limit closes all but 256 at once.
        await run_phase("one-src", node, probe_request,
                        phase_silent(proxy, args.silent, args.silent, 2.0, first=9)),
        await run_phase("heads", node, probe_request,
                        phase_heads(proxy, args.heads, args.per_source, args.head_bytes, args.phase_seconds)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silent", type=int, default=10000, help="silent sockets (default 10000)")
    parser.add_argument("--heads", type=int, default=1000, help="clients holding a maximum-size head (default 1000)")
    parser.add_argument("--head-bytes", type=int, default=65536,
                        help="size of those heads (the node's --max-header-bytes)")
    parser.add_argument("--flood-clients", type=int, default=20, help="clients asking the 1xx-flooding origin")
    parser.add_argument("--per-source", type=int, default=200,
                        help="sockets per loopback source (under the per-client limit)")
    parser.add_argument("--phase-seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--first-byte-timeout", type=float, default=10.0, help="the node's --first-byte-timeout")
    parser.add_argument("--rss-bound-mb", type=float, default=512.0, help="the node's RSS must stay under this")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    raise_fd_limit(max(args.silent, args.heads) + 2048)
    workdir = Path(tempfile.mkdtemp(prefix="safesquid-memory-"))
    origin = start_origin(workdir / "origin")
    node = None
    try:
        policy = workdir / "policy.json"
        policy.write_text('{"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []}}')
        node = start_node(workdir / "node", str(policy),
                          ["--max-connections", str(max(args.silent, args.heads) + 1000),
                           "--first-byte-timeout", str(args.first_byte_timeout)])
        results = asyncio.run(main_async(args, node, origin))
    finally:
        if node is not None:
            node.stop()
        origin.stop()
    worst = 0.0
    print(f"\nnode RSS bound: {args.rss_bound_mb:.0f} MB (figures taken on whatever else the machine runs)")
    print(f"{'phase':8} {'RSS before':>11} {'RSS peak':>9} {'probe ok/failed':>16} {'slowest':>8}  what happened")
    for r in results:
        worst = max(worst, r.rss_peak_mb)
        print(f"{r.name:8} {r.rss_before_mb:9.1f}MB {r.rss_peak_mb:7.1f}MB {r.probe.ok:>8}/{r.probe.failed:<7} "
              f"{r.probe.slowest:7.2f}s  {r.detail}")
        for error in r.probe.errors:
            print(f"{'':8} probe error: {error}")
    served = all(r.probe.ok > 0 and r.probe.failed == 0 for r in results)
    within = worst < args.rss_bound_mb
    print(f"\npeak RSS {worst:.1f} MB: {'within' if within else 'OVER'} the bound; "
          f"the probe client was {'served throughout' if served else 'NOT always served'}")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept {workdir}")
    return 0 if within and served else 1


if __name__ == "__main__":
    sys.exit(main())
