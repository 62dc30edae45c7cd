"""SIGHUP on every role reloads and never stops the node; logs an operator can read: no factory
lines per reconnection, no master-key lines on nodes without one, one line for a bad option, and
a slave that cannot bind its listener exits 1 with one critical line."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

import harness
from cluster_harness import cluster, fetch, slave_host  # noqa: F401 - fixture
from harness import RawConnection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


class EchoServer(threading.Thread):
    """A plain TCP echo server on loopback (what a CONNECT tunnel reaches)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def _twistd_output(node) -> str:
    paths = (node.state_dir / "twistd.out", node.node.twistd_log)
    return "".join(p.read_text(errors="replace") for p in paths if p.exists())


def _round_trip(conn: RawConnection, payload: bytes) -> None:
    conn.send(payload)
    received = b""
    deadline = time.monotonic() + 5
    while len(received) < len(payload) and time.monotonic() < deadline:
        data = conn.read_some(timeout=5)
        assert data, "the tunnel closed"
        received += data
    assert received == payload


def test_sighup_reloads_a_slave_and_its_tunnel_survives(cluster, origins):
    echo = EchoServer()
    echo.start()
    cluster.start_master(harness.make_policy(connect={"allowed_ports": [echo.port]}))
    slave = cluster.add_slave(keepalive=1)
    before = cluster.wait_connected(slave.name)
    tunnel = RawConnection(slave.proxy)
    authority = f"127.0.0.1:{echo.port}"
    tunnel.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    status, _headers = tunnel.read_head(timeout=10)
    assert status == 200
    _round_trip(tunnel, b"before the reload")

    assert fetch(slave, origins.url("/before-sighup")).status == 200
    harness.wait_until(lambda: (slave.state_dir / "logs" / "access.log").exists(), 10, "access.log")
    mark = slave.extended_mark()
    (slave.state_dir / "logs" / "access.log").rename(slave.state_dir / "logs" / "access.log.moved")
    slave.signal(signal.SIGHUP)
    slave.wait_for_lines(lambda line: "SIGHUP:" in line and "reopen access.log" in line, since=mark)
    _round_trip(tunnel, b"after the reload")
    assert slave.alive() and slave.health()[0] == 200
    assert fetch(slave, origins.url("/after-sighup")).status == 200
    harness.wait_until(lambda: (slave.state_dir / "logs" / "access.log").exists(), 10,
                       "access.log opened again after SIGHUP")
    after = cluster.wait_connected(slave.name)
    assert after["connected_since"] == before["connected_since"], "SIGHUP must not reset the control plane"
    tunnel.close()

    # The master reloads too (its policy file), and stays up.
    mark = cluster.master.extended_mark()
    cluster.master.signal(signal.SIGHUP)
    cluster.master.wait_for_lines(lambda line: "SIGHUP" in line, since=mark)
    assert cluster.master.alive() and cluster.master.health()[0] == 200

    # Restarting the master: the slave reconnects without factory lines; only the master has a
    # master identity line.
    cluster.master.kill()
    cluster.master.start()
    cluster.wait_connected(slave.name, timeout=10)
    slave_log = slave.extended_text() + _twistd_output(slave)
    assert "Starting factory" not in slave_log and "Stopping factory" not in slave_log
    assert "master identity" not in slave_log and "made the master's key" not in slave_log
    assert "portal identity" in slave_log
    assert "master identity" in _twistd_output(cluster.master)
    assert "Traceback" not in slave_log


def test_a_bad_option_is_one_line_with_a_pointer_to_help(tmp_path):
    result = harness.run_twistd(["--no-such-option"], cwd=tmp_path)
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip().splitlines()
    assert len(output) == 1, output
    assert "no-such-option" in output[0] and "--help" in output[0]


def test_a_slave_that_cannot_bind_exits_1_with_one_critical_line(cluster, tmp_path):
    cluster.start_master(harness.make_policy())
    host = slave_host(3)
    taken = socket.socket()
    taken.bind((host, 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        slave = cluster.slave(host=host)
        argv = ["--listen", f"tcp:{port}:interface={host}", "--portal", f"tcp:0:interface={host}",
                "--state-dir", str(tmp_path / "slave-state"), "--stop-grace", "0", *slave.args]
        started = time.monotonic()
        result = harness.run_twistd(argv, cwd=tmp_path, timeout=60)
    finally:
        taken.close()
    took = time.monotonic() - started
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:])
    critical = [line for line in result.stdout.splitlines() if "critical" in line.lower()]
    assert len(critical) == 1 and "cannot listen" in critical[0], critical
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    cannot = next(i for i, line in enumerate(lines) if "cannot listen" in line)
    assert not [line for line in lines[cannot:] if "started: role" in line]
    assert took < 30
