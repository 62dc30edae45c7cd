"""The portal of a real node under abuse: a 64 MiB login body and 200 parallel wrong passwords.

What is asserted is bounded behaviour (413 from the head alone, throttled attempts refused
before any hashing, a bounded number of concurrent password checks, memory that stays within
a bound); the node's RSS (from /proc) and a proxy request's latency during each flood are
printed for the record (`pytest -s`), never compared with a time.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

import harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1024 * 1024
LOGIN_TOKEN = re.compile(rb'name="login_token" value="([^"]+)"')


class Sampler:
    """Samples the node's RSS and a proxy request's latency until stopped."""

    def __init__(self, node: harness.Node, url: str) -> None:
        self.node, self.url = node, url
        self.rss: list[int] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss.append(harness.read_rss_bytes(self.node.pid))
            started = time.monotonic()
            try:
                response = harness.proxy_request(self.node, "GET", self.url, timeout=30)
                if response.status != 200:
                    self.failures.append(str(response.status))
            except Exception as e:  # noqa: BLE001 - recorded, the test reports it
                self.failures.append(repr(e))
            self.latencies.append(time.monotonic() - started)
            self._stop.wait(0.05)

    def summary(self, baseline_rss: int) -> str:
        lat = sorted(self.latencies) or [0.0]
        return (f"RSS before {baseline_rss / MiB:.0f} MiB, peak {max(self.rss, default=0) / MiB:.0f} MiB; "
                f"proxy latency median {lat[len(lat) // 2] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms "
                f"over {len(lat)} requests")


def quiet_latency(node: harness.Node, url: str, count: int = 20) -> str:
    """A proxy request's latency with no flood, on the same loaded machine, for comparison."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        harness.proxy_request(node, "GET", url, timeout=30)
        times.append(time.monotonic() - started)
        time.sleep(0.05)
    times.sort()
    return f"without a flood: median {times[len(times) // 2] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms"


def _recv_head(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _push_body(host: str, port: int, size: int, results: list[tuple[bytes, int]]) -> None:
    """Send a login head announcing `size` bytes, then try to send them all without waiting."""
    sock = socket.create_connection((host, port), timeout=30)
    sent = 0
    try:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: portal\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        block = b"a" * (256 * 1024)
        try:
            while sent < size:
                sent += sock.send(block[: size - sent])
        except OSError:
            pass  # the node closed the connection: expected
        try:
            answer = _recv_head(sock, 5)
        except OSError:
            answer = b""
        results.append((answer, sent))
    finally:
        sock.close()


@pytest.fixture
def node(node_factory, origins):
    return node_factory.start(policy=harness.make_policy())


def test_a_64_mib_login_body_is_refused_from_the_head_and_memory_stays_flat(node, origins):
    host, port = node.portal
    # One polite client first: the answer comes before any body byte is sent.
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: portal\r\nContent-Length: %d\r\n\r\n" % (64 * MiB))
        head = _recv_head(sock)
    assert head.startswith(b"HTTP/1.1 413 "), head[:200]
    assert b"Connection: close" in head

    baseline = harness.read_rss_bytes(node.pid)
    results: list[tuple[bytes, int]] = []
    with Sampler(node, origins.url("/during-body-flood")) as sampler:
        for _round in range(4):
            pushers = [threading.Thread(target=_push_body, args=(host, port, 64 * MiB, results)) for _ in range(16)]
            for t in pushers:
                t.start()
            for t in pushers:
                t.join(60)
    print(f"\n64 MiB login bodies, 4 rounds of 16 at once: {sampler.summary(baseline)}; "
          f"{quiet_latency(node, origins.url('/quiet'))}; "
          f"bytes the clients got out before the close: max {max(s for _, s in results) / MiB:.1f} MiB")
    assert len(results) == 64
    assert all(answer.startswith(b"HTTP/1.1 413 ") or not answer for answer, _ in results)
    assert not sampler.failures, sampler.failures
    # The node never holds the bodies: far less than one of them per connection.
    assert max(sampler.rss) - baseline < 48 * MiB
    assert node.alive()
    assert harness.proxy_request(node, "GET", origins.url("/after")).status == 200


def _login_token(node: harness.Node) -> tuple[str, str]:
    host, port = node.portal
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: portal\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    token = LOGIN_TOKEN.search(data).group(1).decode()
    cookie = re.search(rb"safesquid_login=([^;]+)", data).group(1).decode()
    return token, cookie


def _post_login(node: harness.Node, token: str, cookie: str, name: str, password: str,
                source: str | None, barrier: threading.Barrier, codes: list[int]) -> None:
    body = f"name={name}&password={password}&login_token={token}".encode()
    request = (b"POST /login HTTP/1.1\r\nHost: portal\r\nConnection: close\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\nCookie: safesquid_login=%s\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (cookie.encode(), len(body), body))
    try:
        sock = socket.create_connection(node.portal, timeout=60, source_address=(source, 0) if source else None)
        barrier.wait(30)
        sock.sendall(request)
        head = _recv_head(sock, 60)
        sock.close()
        codes.append(int(head.split(b" ", 2)[1]))
    except Exception:  # noqa: BLE001
        codes.append(0)


def _flood_logins(node, origins, names, sources) -> tuple[list[int], Sampler, int]:
    token, cookie = _login_token(node)
    codes: list[int] = []
    barrier = threading.Barrier(len(names))
    baseline = harness.read_rss_bytes(node.pid)
    with Sampler(node, origins.url("/during-login-flood")) as sampler:
        threads = [threading.Thread(target=_post_login,
                                    args=(node, token, cookie, name, "wrong-password-123", source, barrier, codes))
                   for name, source in zip(names, sources)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return codes, sampler, baseline


def test_200_parallel_wrong_passwords_from_one_address_are_checked_one_at_a_time(node, origins):
    codes, sampler, baseline = _flood_logins(node, origins, ["admin"] * 200, [None] * 200)
    checked = codes.count(401)
    print(f"\n200 parallel wrong passwords, one account and address: {checked} checked, "
          f"{codes.count(429)} throttled before hashing; {sampler.summary(baseline)}; "
          f"{quiet_latency(node, origins.url('/quiet'))}")
    assert len(codes) == 200 and 0 not in codes, codes
    assert set(codes) <= {401, 429}
    assert checked <= 3  # one in flight at a time, then the growing delay refuses the rest
    assert not sampler.failures, sampler.failures
    assert max(sampler.rss) - baseline < 200 * MiB


def test_200_parallel_logins_from_200_addresses_are_capped_node_wide(node, origins):
    names = [f"user{i}" for i in range(200)]
    sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(200)]
    codes, sampler, baseline = _flood_logins(node, origins, names, sources)
    print(f"\n200 parallel wrong passwords, 200 accounts and addresses: {codes.count(401)} checked, "
          f"{codes.count(503)} told busy before hashing, {codes.count(429)} throttled; {sampler.summary(baseline)}; "
          f"{quiet_latency(node, origins.url('/quiet'))}")
    assert len(codes) == 200 and 0 not in codes, codes
    assert set(codes) <= {401, 429, 503}
    assert codes.count(503) > 0  # the queue of password checks is bounded
    assert not sampler.failures, sampler.failures
    # At most two argon2id checks (64 MiB each) at once, whatever arrives.
    assert max(sampler.rss) - baseline < 256 * MiB


def test_an_unusable_state_dir_is_one_clear_line_not_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = harness.run_twistd(["--state-dir", str(blocker / "state"), "--portal", "tcp:0:interface=127.0.0.2",
                                 "--listen", "tcp:0:interface=127.0.0.2"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert "--state-dir" in output and "cannot create it" in output


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes into read-only directories anyway")
def test_a_read_only_state_dir_is_one_clear_line(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    result = harness.run_twistd(["--state-dir", str(state), "--portal", "tcp:0:interface=127.0.0.2",
                                 "--listen", "tcp:0:interface=127.0.0.2"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output and "--state-dir" in output
