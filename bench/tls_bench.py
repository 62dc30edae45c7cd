"""TLS inspection benchmark: safesquid-tw against Squid ssl-bump and mitmproxy, same run, same layout.

Two loads, each through every proxy to one HTTPS origin (nginx with a test CA's certificate, which
every proxy is told to trust):

- tunnels: a new CONNECT per tunnel, a full TLS handshake (no session resumption) verifying the
  proxy's minted leaf against its CA, one small GET, close;
- keep-alive: tunnels carrying REQUESTS_PER_TUNNEL GETs each.

On a shared machine rates are noisy, so the figures that count are the proxy's own CPU time
(user + system, its helper processes included) read from /proc, per tunnel and per request. The
client runs in separate processes and is not counted.

    python bench/tls_bench.py [--tunnels 300] [--keepalive-tunnels 40] [--clients 4]
        [--mitmdump PATH] [--skip squid,mitmproxy]

Squid runs twice: peeking at step 1 then bumping (what a policy on the SNI needs), and bumping
at step 1. mitmproxy belongs in its own virtualenv (pip install mitmproxy), never the project's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import (  # noqa: E402
    _NGINX_TEMP_PATHS,
    BenchError,
    Running,
    free_port,
    machine_busy_seconds,
    read_cpu_seconds,
    start_node,
    wait_until,
)

REQUESTS_PER_TUNNEL = 20
BODY = b"x" * 100
# Figures measured with one pinned core (issue 11), ms of proxy CPU.
ANCHORS = {
    "squid-peek-bump": (10.2, 0.74),
    "squid-bump-step1": (2.7, 0.39),
    "mitmproxy": (21.3, 4.9),
}


# -- the origin -------------------------------------------------------------------------------

def start_tls_origin(workdir: Path, cert: Path, key: Path) -> Running:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    build = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    port = free_port()
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "small").write_bytes(BODY)
    temp_paths = "\n".join(f"    {d} {workdir / d};" for d, m in _NGINX_TEMP_PATHS.items()
                           if m is None or f"--without-{m}_module" not in build)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
master_process off;
daemon off;
worker_processes 1;
pid {workdir / 'nginx.pid'};
error_log {workdir / 'error.log'} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    ssl_session_cache shared:SSL:10m;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {www};
    }}
}}
""")
    popen = subprocess.Popen([nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    origin = Running("nginx-tls", popen, "127.0.0.1", port, workdir / "error.log")

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return True
        except OSError:
            return False

    wait_until(up, 20, "the TLS origin", origin)
    return origin


# -- the proxies ------------------------------------------------------------------------------

def start_safesquid(workdir: Path, ca_cert: bytes, ca_key: bytes, origin_port: int, origin_ca: Path) -> Running:
    state = workdir / "safesquid-state"
    (state / "tls").mkdir(parents=True, exist_ok=True)
    (state / "tls" / "inspection-ca.crt").write_bytes(ca_cert)
    key_path = state / "tls" / "inspection-ca.key"
    key_path.write_bytes(ca_key)
    os.chmod(key_path, 0o600)
    policy = workdir / "policy.json"
    policy.write_text(json.dumps({
        "format": "safesquid-policy/1",
        "access": {"default_action": "allow", "rules": []},
        "connect": {"allowed_ports": [origin_port]},
        "tls_inspection": {"enabled": True},
    }))
    node = start_node(state, str(policy), ["--upstream-ca-file", str(origin_ca)], host="127.0.0.2")
    node.extra["ca"] = state / "tls" / "inspection-ca.crt"
    return node


def start_squid(workdir: Path, ca_cert_path: Path, ca_key_path: Path, origin_ca: Path, *, peek: bool,
                access_log: bool = False) -> Running:
    name = "squid-peek-bump" if peek else "squid-bump-step1"
    sdir = workdir / name
    sdir.mkdir(parents=True, exist_ok=True)
    db = sdir / "ssl_db"
    certgen = "/usr/lib/squid/security_file_certgen"
    subprocess.run([certgen, "-c", "-s", str(db), "-M", "16MB"], check=True, capture_output=True)
    port = free_port()
    steps = "acl step1 at_step SslBump1\nssl_bump peek step1\nssl_bump bump all\n" if peek else "ssl_bump bump all\n"
    conf = sdir / "squid.conf"
    conf.write_text(f"""
http_port 127.0.0.1:{port} ssl-bump tls-cert={ca_cert_path} tls-key={ca_key_path} generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program {certgen} -s {db} -M 16MB
sslcrtd_children 4 startup=1 idle=1
{steps}
tls_outgoing_options cafile={origin_ca}
http_access allow all
cache deny all
{f"access_log stdio:{sdir / 'access.log'}" if access_log else "access_log none"}
cache_log {sdir / 'cache.log'}
pid_filename {sdir / 'squid.pid'}
coredump_dir {sdir}
cache_effective_user proxy
visible_hostname tls-bench
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
""")
    for path in (sdir, db, *db.rglob("*")):
        shutil.chown(path, "proxy", "proxy")
    popen = subprocess.Popen(["squid", "-N", "-f", str(conf)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=sdir)
    proxy = Running(name, popen, "127.0.0.1", port, sdir / "cache.log")
    proxy.extra["ca"] = ca_cert_path

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return True
        except OSError:
            return False

    wait_until(up, 30, name, proxy)
    return proxy


def start_mitmproxy(workdir: Path, mitmdump: str, origin_ca: Path) -> Running:
    confdir = workdir / "mitm"
    confdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    popen = subprocess.Popen(
        [mitmdump, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port), "--set", f"confdir={confdir}",
         "--set", f"ssl_verify_upstream_trusted_ca={origin_ca}", "--set", "http2=false"],
        stdout=subprocess.DEVNULL, stderr=open(confdir / "mitm.log", "wb"), stdin=subprocess.DEVNULL)
    proxy = Running("mitmproxy", popen, "127.0.0.1", port, confdir / "mitm.log")
    proxy.extra["ca"] = confdir / "mitmproxy-ca-cert.pem"

    def up() -> bool:
        if not proxy.extra["ca"].exists():
            return False
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return True
        except OSError:
            return False

    wait_until(up, 60, "mitmproxy", proxy)
    return proxy


# -- the client (in worker processes) ---------------------------------------------------------

def _read_response(tls: ssl.SSLSocket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed mid-head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected answer: {head[:200]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk


def one_tunnel(proxy: tuple[str, int], origin_port: int, cafile: str, requests: int) -> None:
    ctx = _contexts.get(cafile)
    if ctx is None:
        ctx = _contexts[cafile] = ssl.create_default_context(cafile=cafile)
    sock = socket.create_connection(proxy, timeout=30)
    try:
        sock.sendall(f"CONNECT localhost:{origin_port} HTTP/1.1\r\nHost: localhost:{origin_port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("proxy closed during CONNECT")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"CONNECT refused: {head[:200]!r}")
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        request = f"GET /small HTTP/1.1\r\nHost: localhost:{origin_port}\r\n\r\n".encode()
        for _ in range(requests):
            tls.sendall(request)
            _read_response(tls)
        tls.close()
    finally:
        sock.close()


_contexts: dict[str, ssl.SSLContext] = {}


def _worker(args) -> int:
    proxy, origin_port, cafile, tunnels, requests = args
    for _ in range(tunnels):
        one_tunnel(proxy, origin_port, cafile, requests)
    return tunnels


def run_load(pool, proxy: Running, origin_port: int, tunnels: int, requests: int, clients: int) -> float:
    per = [tunnels // clients + (1 if i < tunnels % clients else 0) for i in range(clients)]
    jobs = [((proxy.host, proxy.port), origin_port, str(proxy.extra["ca"]), n, requests) for n in per if n]
    start = time.perf_counter()
    pool.map(_worker, jobs)
    return time.perf_counter() - start


# -- measuring --------------------------------------------------------------------------------

def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (Squid's certificate helpers)."""
    total = read_cpu_seconds(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                total += read_cpu_seconds(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return total


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU of a process's main thread alone: the node's reactor, without its other threads (a
    standalone node's report store ingesting its own records, the spool's fsync, minting)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settle(proxy: Running) -> None:
    """Let work a load left behind finish (records the node ingests every half second), so that
    it is counted with the load that caused it."""
    if proxy.name == "safesquid-tw":
        time.sleep(1.2)


def measure(pool, proxy: Running, origin_port: int, args) -> dict:
    run_load(pool, proxy, origin_port, 2 * args.clients, 1, args.clients)  # warm: the leaf is minted
    _settle(proxy)
    cpu0, busy0, main0 = tree_cpu_seconds(proxy.pid), machine_busy_seconds(), main_thread_cpu_seconds(proxy.pid)
    seconds = run_load(pool, proxy, origin_port, args.tunnels, 1, args.clients)
    busy1 = machine_busy_seconds()
    _settle(proxy)
    cpu1, main1 = tree_cpu_seconds(proxy.pid), main_thread_cpu_seconds(proxy.pid)
    ka_seconds = run_load(pool, proxy, origin_port, args.keepalive_tunnels, REQUESTS_PER_TUNNEL, args.clients)
    _settle(proxy)
    cpu2, main2 = tree_cpu_seconds(proxy.pid), main_thread_cpu_seconds(proxy.pid)
    per_tunnel = (cpu1 - cpu0) / args.tunnels
    ka_requests = args.keepalive_tunnels * REQUESTS_PER_TUNNEL
    ka_cpu = cpu2 - cpu1
    # The marginal cost of a request inside an open tunnel: the keep-alive run minus its
    # tunnels (each priced as in the first run, which includes one request), over the rest.
    marginal = max(ka_cpu - args.keepalive_tunnels * per_tunnel, 0.0) / (ka_requests - args.keepalive_tunnels)
    return {
        "proxy": proxy.name,
        "tunnels_per_s": args.tunnels / seconds,
        "cpu_ms_per_tunnel": per_tunnel * 1000,
        "requests_per_s_keepalive": ka_requests / ka_seconds,
        "cpu_ms_per_request_keepalive": ka_cpu / ka_requests * 1000,
        "cpu_ms_per_extra_request": marginal * 1000,
        "machine_busy_share": (busy1 - busy0) / seconds / (os.cpu_count() or 1),
        # The main thread alone (meaningful for safesquid-tw: its reactor; the rest of the tree is
        # the standalone node's own report store and spool threads, which a slave does not run).
        "main_thread_ms_per_tunnel": (main1 - main0) / args.tunnels * 1000,
        "main_thread_ms_per_request_keepalive": (main2 - main1) / ka_requests * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=300)
    parser.add_argument("--keepalive-tunnels", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--mitmdump", default=os.environ.get("MITMDUMP") or shutil.which("mitmdump") or "mitmdump",
                        help="mitmdump of a separate virtualenv (default: $MITMDUMP, else the PATH)")
    parser.add_argument("--skip", default="", help="comma-separated: safesquid, squid, mitmproxy")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--squid-access-log", action="store_true",
                        help="Squid writes an access.log line per request, as the node records every request")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    import trustme

    from safesquid_tw.proxy.intercept.ca import create_ca

    workdir = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    os.chmod(workdir, 0o755)  # Squid runs as the proxy user
    origin_ca = trustme.CA()
    leaf = origin_ca.issue_cert("localhost", "127.0.0.1")
    (workdir / "origin-ca.pem").write_bytes(origin_ca.cert_pem.bytes())
    (workdir / "origin.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (workdir / "origin.key").write_bytes(leaf.private_key_pem.bytes())
    ca = create_ca("tls-bench inspection CA")
    (workdir / "ca.pem").write_bytes(ca.cert_pem)
    (workdir / "ca.key").write_bytes(ca.key_pem)
    for name in ("origin-ca.pem", "ca.pem", "ca.key"):
        os.chmod(workdir / name, 0o644)

    started: list[Running] = []
    results = []
    pool = multiprocessing.get_context("fork").Pool(args.clients)
    try:
        origin = start_tls_origin(workdir / "origin", workdir / "origin.crt", workdir / "origin.key")
        started.append(origin)
        makers = []
        if "safesquid" not in skip:
            makers.append(lambda: start_safesquid(workdir, ca.cert_pem, ca.key_pem, origin.port, workdir / "origin-ca.pem"))
        if "squid" not in skip and shutil.which("squid"):
            makers.append(lambda: start_squid(workdir, workdir / "ca.pem", workdir / "ca.key", workdir / "origin-ca.pem", peek=True,
                                                     access_log=args.squid_access_log))
            makers.append(lambda: start_squid(workdir, workdir / "ca.pem", workdir / "ca.key", workdir / "origin-ca.pem", peek=False,
                                                     access_log=args.squid_access_log))
        if "mitmproxy" not in skip and shutil.which(args.mitmdump):
            makers.append(lambda: start_mitmproxy(workdir, args.mitmdump, workdir / "origin-ca.pem"))
        for make in makers:
            proxy = make()
            started.append(proxy)
            try:
                results.append(measure(pool, proxy, origin.port, args))
            except Exception as e:
                print(f"{proxy.name}: {e}\n{proxy.log_tail()}", file=sys.stderr)
            finally:
                proxy.stop()
    finally:
        pool.close()
        for running in started:
            running.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    print_table(results, args)
    return 0


def print_table(results: list[dict], args) -> None:
    print(f"\n{args.tunnels} tunnels (new handshake, 1 GET each); {args.keepalive_tunnels} tunnels x "
          f"{REQUESTS_PER_TUNNEL} GETs; {args.clients} client processes; proxy CPU from /proc")
    print(f"{'proxy':18} {'tunnels/s':>10} {'CPU ms/tunnel':>14} {'req/s (ka)':>11} {'CPU ms/req':>11} "
          f"{'CPU ms/extra req':>17} {'anchor tunnel/req':>18}")
    for r in results:
        anchor = ANCHORS.get(r["proxy"])
        anchor_text = f"{anchor[0]:.1f} / {anchor[1]:.2f}" if anchor else "-"
        print(f"{r['proxy']:18} {r['tunnels_per_s']:10.0f} {r['cpu_ms_per_tunnel']:14.2f} "
              f"{r['requests_per_s_keepalive']:11.0f} {r['cpu_ms_per_request_keepalive']:11.3f} "
              f"{r['cpu_ms_per_extra_request']:17.3f} {anchor_text:>18}")
    by_name = {r["proxy"]: r for r in results}
    ours = by_name.get("safesquid-tw")
    if ours is None:
        return
    print(f"\nsafesquid-tw's reactor thread alone (without the standalone node's report store and spool "
          f"threads): {ours['main_thread_ms_per_tunnel']:.2f} ms/tunnel, "
          f"{ours['main_thread_ms_per_request_keepalive']:.3f} ms/req (ka); those threads: "
          f"{ours['cpu_ms_per_tunnel'] - ours['main_thread_ms_per_tunnel']:.3f} ms/tunnel, "
          f"{ours['cpu_ms_per_request_keepalive'] - ours['main_thread_ms_per_request_keepalive']:.3f} ms/req (ka)")
    print("\nTargets (same run):")
    mitm = by_name.get("mitmproxy")
    if mitm:
        ratio = ours["cpu_ms_per_tunnel"] / mitm["cpu_ms_per_tunnel"]
        print(f"  CPU per tunnel vs mitmproxy: {ratio:.2f} (target <= 0.33) {'OK' if ratio <= 1 / 3 else 'MISSED'}")
    peek = by_name.get("squid-peek-bump")
    if peek:
        ratio = ours["cpu_ms_per_tunnel"] / peek["cpu_ms_per_tunnel"]
        print(f"  CPU per tunnel vs Squid peek+bump: {ratio:.2f} (target <= 1) {'OK' if ratio <= 1 else 'MISSED'}")
        ratio = ours["cpu_ms_per_request_keepalive"] / peek["cpu_ms_per_request_keepalive"]
        print(f"  CPU per request in keep-alive tunnels (set-up shared) vs Squid peek+bump: {ratio:.2f} "
              f"(target <= 1) {'OK' if ratio <= 1 else 'MISSED'}")
        ratio = ours["cpu_ms_per_extra_request"] / max(peek["cpu_ms_per_extra_request"], 1e-9)
        print(f"  CPU per extra request in an open tunnel vs Squid peek+bump: {ratio:.2f} (target <= 1) {'OK' if ratio <= 1 else 'MISSED'}")
    step1 = by_name.get("squid-bump-step1")
    if step1:
        ratio = ours["cpu_ms_per_tunnel"] / step1["cpu_ms_per_tunnel"]
        print(f"  CPU per tunnel vs Squid bump at step 1 (moonshot): {ratio:.2f} {'OK' if ratio <= 1 else 'not reached'}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"tls_bench: {e}", file=sys.stderr)
        sys.exit(1)
