"""Memory of a node holding many idle keep-alive client connections (target: 10,000 in 400 MB).

    .venv/bin/python bench/idle_conns.py [--count 10000] [--mode request|connect] [--hold 10]

Starts a local origin and a standalone node (with --max-connections above the count and long
idle and head timeouts), then opens `--count` client connections to the node's proxy port. In
`request` mode each connection first fetches the origin's small file through the proxy and then
stays open, idle, as a browser's keep-alive connection does; in `connect` mode it only connects.
Prints the node's RSS before and with all connections open, the growth per connection, how many
connections the node still held at the end, and the verdict against the target. Loopback only;
every connection is closed and every process stopped at the end. `--proxy reference` measures
bench/reference_proxy.py (with --keep-alive) the same way, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from big_policy import write_policy_file
from harness import (
    SMALL_BODY,
    BenchError,
    Running,
    body_length,
    check_proxies_small_file,
    parse_response_head,
    read_status_kib,
    small_file_request,
    start_node,
    start_origin,
    start_reference_proxy,
)

TARGET_BYTES = 400 * 1000 * 1000
# Descriptors beyond one per connection: the interpreter, logs, listening ports, upstream pool.
FD_MARGIN = 1024
# Bind before connect without reserving a port yet, so one source address can reach many ports.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass
class OpenResult:
    sockets: list[socket.socket]
    failures: int
    first_error: str | None
    seconds: float


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE to at least `needed` (children started later inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft, hard
    if hard >= needed or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return needed, hard
    try:
        # Raising the hard limit needs CAP_SYS_RESOURCE (root).
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        return needed, needed
    except (ValueError, OSError) as e:
        raise BenchError(
            f"{needed} file descriptors are needed but the hard limit is {hard} and cannot be raised ({e}). "
            f"Raise it before starting (ulimit -Hn {needed} as root with CAP_SYS_RESOURCE, or nofile in "
            f"/etc/security/limits.conf), "
            f"or pass a smaller --count."
        ) from None


PER_CLIENT = 250  # below the node's default --max-connections-per-client (256)


def source_addresses(count: int, sources: int | None) -> list[str]:
    """Loopback source addresses enough for `count` connections to one proxy port."""
    if sources is None:
        try:
            with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
                low, high = (int(x) for x in f.read().split())
        except OSError:
            low, high = 32768, 60999
        # Leave a fifth of the range for the proxy's own upstream connections and everything else.
        per_source = max(1, (high - low + 1) * 4 // 5)
        # No more than the node's --max-connections-per-client (256 by default, counted for the
        # whole node, across its workers) from any one address.
        per_source = min(per_source, PER_CLIENT)
        sources = max(1, math.ceil(count / per_source))
    # 127.0.0.2 is where the node listens; the clients come from the other loopback addresses.
    return ["127.0.0.1"] + [f"127.0.0.{i}" for i in range(3, 2 + sources)]


async def _read_response(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Read one response to its end (Content-Length or chunked) and check it is the small file."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError("closed before the response head ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_response_head(head)
    length = body_length(headers)
    while (len(body) < length) if length is not None else not body.endswith(b"0\r\n\r\n"):
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError("closed inside the body")
        body += chunk
    if status != 200 or SMALL_BODY not in body:
        raise ConnectionError(f"unexpected answer: {head[:200]!r}")
    if any(v.lower() == b"close" for v in headers.get(b"connection", [])):
        raise ConnectionError("the proxy announced it closes the connection")


async def _open_one(loop, proxy: Running, source: str, request: bytes | None, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (proxy.host, proxy.port)), timeout)
        if request is not None:
            await asyncio.wait_for(loop.sock_sendall(sock, request), timeout)
            await asyncio.wait_for(_read_response(loop, sock), timeout)
        return sock
    except BaseException:
        sock.close()
        raise


async def open_connections(proxy: Running, origin: Running, count: int, mode: str, sources: list[str],
                           concurrency: int, timeout: float) -> OpenResult:
    """Open `count` connections, `concurrency` at a time; stop early once failures pile up."""
    loop = asyncio.get_running_loop()
    request = small_file_request(origin) if mode == "request" else None
    gate = asyncio.Semaphore(concurrency)
    result = OpenResult([], 0, None, 0.0)
    give_up_after = max(50, count // 100)
    started = time.monotonic()

    async def one(index: int) -> None:
        async with gate:
            if result.failures >= give_up_after:
                return
            try:
                result.sockets.append(await _open_one(loop, proxy, sources[index % len(sources)], request, timeout))
            except (OSError, asyncio.TimeoutError, ValueError, BenchError) as e:
                result.failures += 1
                result.first_error = result.first_error or f"{type(e).__name__}: {e}"

    await asyncio.gather(*(one(i) for i in range(count)))
    result.seconds = time.monotonic() - started
    return result


def count_still_open(sockets: list[socket.socket]) -> int:
    """Connections the proxy has not closed: a peek finds no EOF, no reset, no pending data."""
    still_open = 0
    for sock in sockets:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
    return still_open


def node_pids(pid: int) -> list[int]:
    """The node's process and its worker processes (its children; --workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            pids.append(int(entry))
    return pids


def open_fd_count(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in node_pids(pid))


def accepted_connections(pid: int, port: int) -> int:
    """Established TCP connections to `port` that process `pid` has accepted (holds a descriptor of).

    The client side alone cannot tell: a connection the kernel completed but the proxy never
    accepted (its accept queue overflowed) also looks established from the client.
    """
    inodes = set()
    for process in node_pids(pid):
        for fd in os.listdir(f"/proc/{process}/fd"):
            try:
                target = os.readlink(f"/proc/{process}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    # fields: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                        count += 1
        except OSError:
            continue
    return count


def rss_bytes(pid: int) -> int:
    """The node's RSS: its own and its workers' (each process's RSS; shared pages counted in
    each, so this errs high)."""
    return sum(read_status_kib(p)["VmRSS"] * 1024 for p in node_pids(pid))


def rss_each(pid: int) -> list[int]:
    return [read_status_kib(p)["VmRSS"] * 1024 for p in node_pids(pid)]


def hold_and_sample(pid: int, seconds: float) -> tuple[int, int]:
    """(largest, last) RSS in bytes over `seconds`, sampled twice a second."""
    samples = [rss_bytes(pid)]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        samples.append(rss_bytes(pid))
    return max(samples), samples[-1]


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000, help="idle connections to open (default 10000)")
    parser.add_argument("--mode", choices=["request", "connect"], default="request",
                        help="request: one request through the proxy, then idle; connect: connect only")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold them all open (default 10)")
    parser.add_argument("--concurrency", type=int, default=100, help="connections being opened at once")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds allowed to open (and use) one connection")
    parser.add_argument("--sources", type=int, help="loopback source addresses to spread over (default: as needed)")
    parser.add_argument("--node-timeout", type=float, default=3600.0,
                        help="the node's --idle-timeout and --head-timeout (default 3600)")
    parser.add_argument("--proxy", choices=["node", "reference"], default="node", help="which proxy to measure")
    parser.add_argument("--workers", help="the node's --workers: N or auto (default: the node's default)")
    parser.add_argument("--policy-rules", type=int, default=200)
    parser.add_argument("--policy-domains", type=int, default=10000)
    parser.add_argument("--twistd", help="twistd to run the node with (default: beside this Python)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, policy)")
    return parser.parse_args(argv)


def start_proxy(args: argparse.Namespace, workdir: Path) -> Running:
    if args.proxy == "reference":
        # The stock reference tells clients "Connection: close" (while keeping the connection open);
        # --keep-alive leaves that out, so request mode can hold its connections as with the node.
        return start_reference_proxy(workdir / "reference", host="127.0.0.2", keep_alive=True)
    policy = write_policy_file(args.policy_rules, args.policy_domains, directory=str(workdir))
    limits = [
        "--max-connections", str(args.count + max(100, args.count // 10)),
        "--idle-timeout", str(args.node_timeout),
        "--head-timeout", str(args.node_timeout),
        *(["--workers", args.workers] if args.workers else []),
    ]
    return start_node(workdir / "node-state", policy, limits, twistd=args.twistd)


def run(args: argparse.Namespace, workdir: Path, started: list[Running]) -> bool:
    soft, hard = raise_fd_limit(args.count + FD_MARGIN)
    sources = source_addresses(args.count, args.sources)
    print(f"RLIMIT_NOFILE {soft} (hard {hard}); {args.count} connections in {args.mode} mode from {', '.join(sources)}")
    origin = start_origin(workdir / "origin")
    started.append(origin)
    proxy = start_proxy(args, workdir)
    started.append(proxy)
    print(f"{proxy.name} at {proxy.address} (pid {proxy.pid}); origin {origin.name} at {origin.address}")

    # Warm up so that lazily built state (imports, compiled policy, first pool) is in the baseline.
    for _ in range(20):
        check_proxies_small_file(proxy, origin)
    time.sleep(1.0)
    before, fds_before = rss_bytes(proxy.pid), open_fd_count(proxy.pid)

    opened = asyncio.run(open_connections(proxy, origin, args.count, args.mode, sources, args.concurrency, args.timeout))
    sockets = opened.sockets
    try:
        print(f"opened {len(sockets)} of {args.count} in {opened.seconds:.1f} s; failures {opened.failures}"
              + (f" (first: {opened.first_error})" if opened.first_error else ""))
        time.sleep(1.0)
        peak, last = hold_and_sample(proxy.pid, args.hold)
        # Counted after the hold: in connect mode the proxy may still be accepting a moment after.
        fds_with = open_fd_count(proxy.pid)
        still_open = count_still_open(sockets)
        accepted = accepted_connections(proxy.pid, proxy.port)
        hwm = sum(read_status_kib(p)["VmHWM"] * 1024 for p in node_pids(proxy.pid))
        each = rss_each(proxy.pid)
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(2.0)
    after_close = rss_bytes(proxy.pid)

    held = max(1, len(sockets))
    growth = peak - before
    rows = [
        ("RSS before", f"{mb(before)}  ({fds_before} descriptors)"),
        (f"RSS with {len(sockets)} open", f"{mb(peak)} peak, {mb(last)} last  ({fds_with} descriptors)"),
        ("growth per connection", f"{growth / held / 1024:.1f} KiB  ({mb(growth)} in all)"),
        ("peak RSS of the processes (VmHWM)", mb(hwm)),
        ("RSS per process with them open", f"node {mb(each[0])}; workers " + ", ".join(mb(n) for n in each[1:])
         if len(each) > 1 else mb(each[0])),
        ("RSS after closing them all", mb(after_close)),
        (f"still open after {args.hold:g} s idle", f"{still_open} of {len(sockets)} (client side)"),
        ("held by the proxy", f"{accepted} accepted and established (proxy side)"),
    ]
    print(f"\n{proxy.name}, {args.mode} mode:")
    for label, value in rows:
        print(f"  {label:<34}{value}")
    complete = opened.failures == 0 and len(sockets) == args.count and still_open == accepted == len(sockets)
    if not complete:
        print("NOT every connection was opened and held: the figures above are not a valid result")
    projected = before + growth / held * 10000
    met = "met" if complete and peak <= TARGET_BYTES and projected <= TARGET_BYTES else "NOT met"
    print(f"target: {args.count} idle connections within {mb(TARGET_BYTES)} -> {mb(peak)}: {met}"
          f" (projected for 10000: {mb(projected)})")
    return complete


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="idle-conns-"))
    started: list[Running] = []
    ok = False
    try:
        ok = run(args, workdir, started)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
    finally:
        for process in reversed(started):
            process.stop()
        if args.keep or not ok:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
