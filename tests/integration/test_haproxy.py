"""etc/haproxy.cfg in front of two real slaves: a graceful stop loses no request, and a slave
killed outright is routed around within the check interval.

The configuration HAProxy runs is the sample itself with only addresses changed (the slaves'
ports, a loopback bind) and the lines that need a system install dropped (chroot, user, syslog,
daemon); balancing, checks, timeouts, retries and the PROXY protocol are the sample's own, so the
slaves listen with `haproxy:` listeners as the sample says.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
from cluster_harness import cluster, free_ports, slave_host  # noqa: F401 - fixture
from harness import build_request, raw_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

SAMPLE = harness.REPO_ROOT / "etc" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (scripts/test installs it with apt-get)")
BALANCER_HOST = "127.0.0.10"
CLIENTS = 4
_SERVER = re.compile(r"^(\s*server\s+(\S+)\s+)\S+(\s+check\s+port\s+)\d+(.*)$")
_SYSTEM_ONLY = re.compile(r"^\s*(log\s+/|chroot\b|user\b|group\b|daemon\b)")


def sample_settings(name: str) -> float:
    """A timing of the sample's default-server line (inter, fall...), in seconds or counts."""
    line = next(l for l in SAMPLE.read_text().splitlines() if l.strip().startswith("default-server"))
    words = line.split()
    value = words[words.index(name) + 1]
    if value.endswith("ms"):
        return float(value[:-2]) / 1000
    return float(value.rstrip("s"))


def render_config(slaves: dict[str, tuple[tuple[str, int], tuple[str, int]]], bind: tuple[str, int],
                  stats: tuple[str, int], admin_socket: Path) -> str:
    """The sample with the given addresses. `slaves`: name -> ((proxy host, port), (portal host, port))."""
    out, servers = [], 0
    for line in SAMPLE.read_text().splitlines():
        if _SYSTEM_ONLY.match(line):
            continue
        m = _SERVER.match(line)
        if m:
            (proxy_host, proxy_port), (portal_host, portal_port) = slaves[m.group(2)]
            assert portal_host == proxy_host, "the sample checks the slave's own address"
            line = f"{m.group(1)}{proxy_host}:{proxy_port}{m.group(3)}{portal_port}{m.group(4)}"
            servers += 1
        elif line.strip() == "bind :3128":
            line = line.replace(":3128", f"{bind[0]}:{bind[1]}")
        elif line.strip().startswith("bind 127.0.0.1:8404"):
            line = line.replace("127.0.0.1:8404", f"{stats[0]}:{stats[1]}")
        out.append(line)
        if line.strip() == "global":
            out.append(f"    stats socket {admin_socket} level admin")
    assert servers == len(slaves), f"the sample names {servers} servers, the test has {len(slaves)} slaves"
    return "\n".join(out) + "\n"


class HAProxy:
    def __init__(self, workdir: Path, config: str, bind: tuple[str, int], admin_socket: Path,
                 file_limit: int | None = None) -> None:
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(config)
        self.bind = bind
        self.admin_socket = admin_socket
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, f"haproxy refuses the rendered sample:\n{check.stdout}{check.stderr}"
        self.log = open(workdir / "haproxy.log", "wb")
        def limit_files():  # in the child: an ordinary open-files limit (ulimit -n), soft and hard
            if file_limit is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

        self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)], stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=limit_files)

    def info(self) -> dict[str, str]:
        """`show info` from the admin socket (Maxconn, Ulimit-n, ...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.admin_socket))
            s.sendall(b"show info\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return dict(line.split(": ", 1) for line in data.decode().splitlines() if ": " in line)

    def server_states(self) -> dict[str, str]:
        """Server name -> HAProxy's status for it (UP, DOWN, UP 1/3, ...), from the admin socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.admin_socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "safesquid_slaves" and row.get("svname") not in ("BACKEND", None):
                states[row["svname"]] = row["status"]
        return states

    def wait_states(self, wanted: dict[str, str], timeout: float) -> float:
        started = time.monotonic()

        def reached():
            try:
                states = self.server_states()
            except OSError:
                return False
            return all(states.get(k) == v for k, v in wanted.items())

        harness.wait_until(reached, timeout, f"HAProxy to see {wanted}", interval=0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


class ClientStream:
    """CLIENTS threads sending GETs through HAProxy, a new connection each, until halted."""

    def __init__(self, balancer: tuple[str, int], url_for, limit: int = 20000) -> None:
        self.balancer = balancer
        self.url_for = url_for
        self.limit = limit
        self.results: list[tuple[float, str | None, str]] = []  # (finished at, slave or None, url)
        self.errors: dict[str, str] = {}  # url -> what went wrong
        self.halt = threading.Event()
        self._counter = iter(range(limit))
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def start(self) -> "ClientStream":
        for t in self.threads:
            t.start()
        return self

    def _run(self) -> None:
        while not self.halt.is_set():
            with self._lock:
                i = next(self._counter, None)
            if i is None:
                return
            url = self.url_for(i)
            served_by = error = None
            try:
                response = raw_request(self.balancer, build_request("GET", url, [("Connection", "close")]),
                                       timeout=10, close_wait=0.0)
                if response.status == 200:
                    via = " ".join(harness.echo_headers(response.json(), "via"))
                    served_by = next((name for name in ("slave1", "slave2") if name in via), "?")
                else:
                    error = f"{response.status} {response.text[:200]!r}"
            except (OSError, harness.HarnessError, ValueError) as e:
                error = repr(e)[:300]
            with self._lock:
                self.results.append((time.monotonic(), served_by, url))
                if error is not None:
                    self.errors[url] = error

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_more(self, n: int, timeout: float = 20.0) -> None:
        target = self.count() + n
        harness.wait_until(lambda: self.count() >= target, timeout, f"{n} more requests through HAProxy")

    def wait_after(self, since: float, n: int, timeout: float = 20.0) -> None:
        """Until `n` requests have finished after the moment `since` (time.monotonic())."""
        def enough():
            with self._lock:
                return sum(1 for at, _who, _url in self.results if at >= since) >= n

        harness.wait_until(enough, timeout, f"{n} requests through HAProxy after the moment of interest")

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(15)

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[str]:
        with self._lock:
            return [url for at, who, url in self.results if who is None and since <= at < until]

    def served(self, since: float = 0.0) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for at, who, _url in self.results:
                if who is not None and at >= since:
                    counts[who] = counts.get(who, 0) + 1
        return counts


@pytest.fixture
def balanced(cluster, tmp_path):
    """A master, two slaves on fixed ports, and HAProxy running the sample in front of them."""
    cluster.start_master(harness.make_policy())
    addresses = {}
    for index in range(2):
        host = slave_host(index)
        proxy_port, portal_port = free_ports(host, 2)
        proxy, portal = (host, proxy_port), (host, portal_port)
        cluster.slave(f"slave{index + 1}", args=["--listen", f"haproxy:tcp:{proxy[1]}:interface={host}",
                                                 # HAProxy connects to the slaves from
                                                 # loopback's primary address.
                                                 "--proxy-protocol-from", "127.0.0.1/32",
                                                 "--portal", f"tcp:{portal[1]}:interface={host}",
                                                 # Longer than HAProxy needs to see /health at 503
                                                 # (fall 2 x inter 1 s): the graceful stop.
                                                 "--stop-grace", "3"])
        addresses[f"slave{index + 1}"] = (proxy, portal)
    for node in cluster.slaves:
        node.start()
    bind_port, stats_port = free_ports(BALANCER_HOST, 2)
    bind = (BALANCER_HOST, bind_port)
    admin = tmp_path / "haproxy-admin.sock"
    config = render_config(addresses, bind, (BALANCER_HOST, stats_port), admin)
    balancer = HAProxy(tmp_path, config, bind, admin)
    try:
        balancer.wait_states({"slave1": "UP", "slave2": "UP"}, 15)
        yield cluster, balancer
    finally:
        balancer.stop()


def test_sample_config_is_valid_as_shipped():
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (scripts/test installs it with apt-get)")
    check = subprocess.run([HAPROXY, "-c", "-f", str(SAMPLE)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    text = SAMPLE.read_text()
    for needed in ("balance leastconn", "option httpchk GET /health", "check port"):
        assert needed in text


@needs_haproxy
def test_graceful_stop_loses_no_request(balanced, origins):
    cluster, balancer = balanced
    slave1, _slave2 = cluster.slaves
    stream = ClientStream(balancer.bind, lambda i: origins.url(f"/graceful/{i}")).start()
    try:
        stream.wait_more(200)
        assert set(stream.served()) == {"slave1", "slave2"}, f"not spread over both slaves: {stream.served()}"

        # SIGTERM: slave1 says 503 and stops; no client may notice.
        slave1.stop()
        balancer.wait_states({"slave1": "DOWN"}, 10)
        stopped_at = time.monotonic()
        stream.wait_after(stopped_at, 200)
        assert set(stream.served(since=stopped_at)) == {"slave2"}

        # Back again: HAProxy takes it into the rotation after `rise` good checks.
        slave1.start()
        balancer.wait_states({"slave1": "UP"}, 15)
        back_at = time.monotonic()
        stream.wait_after(back_at, 200)
        assert "slave1" in stream.served(since=back_at)
    finally:
        stream.stop()
    lost = stream.failures()
    assert not lost, f"{len(lost)} requests lost by a graceful stop: {[stream.errors[u] for u in lost]}"


@needs_haproxy
def test_killed_slave_is_routed_around_within_the_check_interval(balanced, origins):
    cluster, balancer = balanced
    _slave1, slave2 = cluster.slaves
    stream = ClientStream(balancer.bind, lambda i: origins.url(f"/killed/{i}")).start()
    try:
        stream.wait_more(200)
        assert set(stream.served()) == {"slave1", "slave2"}, f"not spread over both slaves: {stream.served()}"
        assert not stream.failures()

        # SIGKILL: requests in flight on slave2 die; HAProxy marks it down within its checks.
        killed_at = time.monotonic()
        slave2.kill()
        down_after = balancer.wait_states({"slave2": "DOWN"}, 15)
        marked_down = time.monotonic()
        limit = sample_settings("inter") * sample_settings("fall") + 1.5
        print(f"\nHAProxy marked the killed slave down after {down_after:.2f} s (limit {limit:.1f} s); "
              f"{len(stream.failures(since=killed_at))} requests failed meanwhile")
        assert down_after <= limit
        stream.wait_after(marked_down + 0.5, 200)
    finally:
        stream.stop()
    failed_around_kill = stream.failures(since=killed_at)
    assert len(failed_around_kill) <= CLIENTS, (
        f"{len(failed_around_kill)} requests failed around the kill: {[stream.errors[u] for u in failed_around_kill]}")
    assert not stream.failures(since=marked_down + 0.5), "requests still failing after HAProxy took the slave out"
    assert set(stream.served(since=marked_down + 0.5)) == {"slave1"}
