"""Processes the proxy benchmarks start and watch: an origin, the reference proxy, a node.

Everything listens on loopback only. Each `start_*` returns a `Running` whose `stop()` ends that
process (SIGTERM, then SIGKILL), and `ProcessSampler` reads a process's memory and CPU from /proc
while a benchmark runs. Run as a script, this module serves the small file itself (the origin used
when nginx is not installed):

    python bench/harness.py --twisted-origin PORT
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SMALL_PATH = "/small"
# ~100 bytes, the size of a small API answer or a tracking pixel.
SMALL_BODY = (b"safesquid-tw benchmark payload: a small static file served by the local origin." + b"." * 20)[:99] + b"\n"


class BenchError(RuntimeError):
    """A process of the benchmark did not start or did not answer as it should."""


@dataclass
class Running:
    """A process the benchmark started, with where it listens."""

    name: str
    popen: subprocess.Popen
    host: str
    port: int
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(host: str, port: int, target: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET, returning (status, body); `target` is a path or, for a proxy, an absolute URL."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until(check, timeout: float, what: str, process: Running | None = None) -> None:
    """Call `check()` until it returns true; fail after `timeout` seconds or if `process` exits."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.popen.poll() is not None:
            raise BenchError(f"{process.name} exited with {process.popen.returncode} while waiting for {what}:\n{process.log_tail()}")
        try:
            if check():
                return
        except (OSError, ValueError, http.client.HTTPException) as e:
            last_error = e
        time.sleep(0.1)
    tail = f"\n{process.log_tail()}" if process is not None else ""
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error}){tail}")


def small_file_request(origin: Running) -> bytes:
    """The benchmark request in absolute form, as a client of a forward proxy sends it."""
    return (f"GET http://{origin.address}{SMALL_PATH} HTTP/1.1\r\nHost: {origin.address}\r\n"
            f"User-Agent: safesquid-tw-bench\r\n\r\n").encode("ascii")


def parse_response_head(head: bytes) -> tuple[int, dict[bytes, list[bytes]]]:
    """Status code and headers (lower-case name to every value) of a response head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise BenchError(f"not an HTTP/1 status line: {lines[0]!r}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(parts[1]), headers


def body_length(headers: dict[bytes, list[bytes]]) -> int | None:
    """Content-Length, None for chunked; refuses framing a strict client (such as wrk) rejects."""
    lengths = headers.get(b"content-length", [])
    chunked = any(b"chunked" in v.lower() for v in headers.get(b"transfer-encoding", []))
    if len(lengths) > 1:
        raise BenchError(f"response framing: {len(lengths)} Content-Length headers {lengths}")
    if lengths and chunked:
        raise BenchError("response framing: both Content-Length and Transfer-Encoding: chunked")
    if chunked:
        return None
    if not lengths or not lengths[0].isdigit():
        raise BenchError(f"response framing: no usable Content-Length or chunked encoding ({lengths})")
    return int(lengths[0])


def check_proxies_small_file(proxy: Running, origin: Running, timeout: float = 5.0) -> None:
    """Fail unless the small file fetched through `proxy` is a clean 200 carrying the file's bytes."""
    with socket.create_connection((proxy.host, proxy.port), timeout=timeout) as sock:
        sock.sendall(small_file_request(origin))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError(f"{proxy.name} closed the connection before the response head ended: {data[:300]!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status, headers = parse_response_head(head)
        try:
            length = body_length(headers)
        except BenchError as e:
            raise BenchError(f"{proxy.name}: {e}\n{head.decode('latin-1')}") from None
        end = b"0\r\n\r\n" if length is None else None
        while (len(body) < length) if length is not None else not body.endswith(end):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    if status != 200 or SMALL_BODY not in body:
        raise BenchError(f"{proxy.name} answered {status} with {body[:200]!r} for the small file, not 200 and the file")


# -- origin -----------------------------------------------------------------------------------

_NGINX_TEMP_PATHS = {
    "client_body_temp_path": None,  # always built in
    "proxy_temp_path": "http_proxy",
    "fastcgi_temp_path": "http_fastcgi",
    "uwsgi_temp_path": "http_uwsgi",
    "scgi_temp_path": "http_scgi",
}


def _nginx_config(workdir: Path, port: int, nginx_build: str) -> str:
    # Every path lives under workdir: nothing is read from or written to the system's nginx paths.
    temp_paths = "\n".join(
        f"    {directive} {workdir / directive};"
        for directive, module in _NGINX_TEMP_PATHS.items()
        if module is None or f"--without-{module}_module" not in nginx_build
    )
    return f"""
# One process, no master: the benchmark starts, measures and stops it directly.
master_process off;
daemon off;
worker_processes 1;
pid {workdir / 'nginx.pid'};
error_log {workdir / 'error.log'} warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
{temp_paths}
    default_type application/octet-stream;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {workdir / 'www'};
    }}
}}
"""


def _write_docroot(workdir: Path) -> None:
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / SMALL_PATH.lstrip("/")).write_bytes(SMALL_BODY)


def start_origin(workdir: Path, prefer_nginx: bool = True) -> Running:
    """An origin on 127.0.0.1 serving SMALL_BODY at SMALL_PATH with keep-alive.

    nginx when it is installed, otherwise a Twisted web server (slower: say so in any figures).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    _write_docroot(workdir)
    port = free_port("127.0.0.1")
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    log_path = workdir / "origin.log"
    if prefer_nginx and nginx:
        build = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
        conf = workdir / "nginx.conf"
        conf.write_text(_nginx_config(workdir, port, build), encoding="utf-8")
        command = [nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
        name = "nginx"
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--twisted-origin", str(port), "--root", str(workdir / "www")]
        name = "twisted-origin"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    origin = Running(name, popen, "127.0.0.1", port, log_path if name != "nginx" else workdir / "error.log")
    try:
        wait_until(lambda: http_get("127.0.0.1", port, SMALL_PATH, 2.0) == (200, SMALL_BODY), 20, f"{name} to serve {SMALL_PATH}", origin)
    except BaseException:
        origin.stop()
        raise
    return origin


def run_twisted_origin(port: int, root: str) -> None:
    from twisted.internet import reactor
    from twisted.web import server, static

    site = server.Site(static.File(root))
    site.log = lambda request: None  # no access log: the origin must not be the bottleneck
    reactor.listenTCP(port, site, backlog=1024, interface="127.0.0.1")
    reactor.run()


# -- proxies ----------------------------------------------------------------------------------


def start_reference_proxy(workdir: Path, host: str = "127.0.0.1", keep_alive: bool = False) -> Running:
    """bench/reference_proxy.py on a free port of `host` (`keep_alive`: its --keep-alive)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "reference_proxy.log"
    port = free_port(host)
    command = [sys.executable, str(BENCH_DIR / "reference_proxy.py"), "--port", str(port), "--interface", host]
    if keep_alive:
        command.append("--keep-alive")
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    proxy = Running("reference", popen, host, port, log_path)
    try:
        wait_until(lambda: "listening" in log_path.read_text(), 20, "the reference proxy to listen", proxy)
    except BaseException:
        proxy.stop()
        raise
    return proxy


def default_twistd() -> str:
    """twistd beside the running interpreter (the project's virtualenv), else the one on PATH."""
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if not found:
        raise BenchError("no twistd found beside this Python or on PATH: run the bench with the project's venv Python")
    return found


def start_node(state_dir: Path, policy_path: str, extra_args: list[str] | None = None, twistd: str | None = None,
               host: str = "127.0.0.2", timeout: float = 60.0, source_root: Path | None = None,
               name: str = "safesquid-tw") -> Running:
    """A standalone safesquid-tw node under twistd, ready once listening.json exists and /health is 200.

    source_root: run the code of another checkout (e.g. the version before a change) instead of this one.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    listen_port, portal_port = free_port(host), free_port(host)
    while portal_port == listen_port:
        portal_port = free_port(host)
    log_path = state_dir / "twistd.log"
    command = [
        twistd or default_twistd(), "-n", "--pidfile=", *os.environ.get("BENCH_TWISTD_ARGS", "").split(), f"--logfile={log_path}", "safesquid",
        # A backlog of 1024 as for the reference proxy: Twisted's default of 50 overflows when a
        # benchmark opens connections in bursts, and the kernel then drops handshakes silently.
        "--listen", f"tcp:{listen_port}:interface={host}:backlog=1024",
        "--portal", f"tcp:{portal_port}:interface={host}",
        "--state-dir", str(state_dir), "--policy", policy_path, *(extra_args or []),
    ]
    if not any(arg.startswith("--workers") for arg in extra_args or []):
        # Figures per process, comparable with one-process anchors: one process unless the bench
        # asks for workers (the node's own default is one worker per CPU).
        command += ["--workers", "1"]
    env = dict(os.environ, PYTHONPATH=str(source_root or REPO_ROOT))
    stdout_path = state_dir / "twistd.stdout"
    with open(stdout_path, "wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=state_dir, env=env)
    node = Running(name, popen, host, listen_port, log_path)
    listening = state_dir / "run" / "listening.json"

    def ready() -> bool:
        if not listening.exists():
            return False
        addresses = json.loads(listening.read_text(encoding="utf-8"))
        portal_host, _, portal = addresses["portal"].rpartition(":")
        node.extra["portal"] = addresses["portal"]
        proxy_host, _, proxy_port = addresses["proxy"].rpartition(":")
        node.host, node.port = proxy_host.strip("[]"), int(proxy_port)
        return http_get(portal_host.strip("[]"), int(portal), "/health", 2.0)[0] == 200

    try:
        wait_until(ready, timeout, "the node to listen and answer /health", node)
    except BenchError as e:
        node.stop()
        startup = stdout_path.read_text(encoding="utf-8", errors="replace")[-3000:] if stdout_path.exists() else ""
        raise BenchError(f"{e}\n{startup}") from None
    except BaseException:
        node.stop()
        raise
    return node


# -- measuring --------------------------------------------------------------------------------


def read_status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/<pid>/status."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def read_cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the command name: state is field 3, utime field 14, stime field 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time spent by the whole machine, all cores, outside idle and I/O wait (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already counted in user).
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


class ProcessSampler:
    """Samples one process's RSS in a background thread between `start()` and `stop()`."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.max_rss_kib = 0
        self.hwm_kib = 0
        self.cpu_seconds = 0.0
        self.wall_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            values = read_status_kib(self.pid)
        except OSError:
            return
        self.max_rss_kib = max(self.max_rss_kib, values.get("VmRSS", 0))
        self.hwm_kib = max(self.hwm_kib, values.get("VmHWM", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "ProcessSampler":
        self._cpu_start = read_cpu_seconds(self.pid)
        self._wall_start = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> "ProcessSampler":
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_seconds = read_cpu_seconds(self.pid) - self._cpu_start
        self.wall_seconds = time.monotonic() - self._wall_start
        return self

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="serve the benchmark's small file with twisted.web")
    parser.add_argument("--twisted-origin", type=int, required=True, metavar="PORT")
    parser.add_argument("--root", required=True)
    args = parser.parse_args(argv)
    run_twisted_origin(args.twisted_origin, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
