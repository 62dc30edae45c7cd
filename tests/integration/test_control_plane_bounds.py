"""The master's control plane before authentication, over real processes: garbage, floods of
bytes and silent peers are closed within the deadline or the byte budget; a peer that breaks the
protocol gets one error and is closed; every refusal is one (rate-limited) log line, never a
traceback; failed key proofs are throttled per source; and meanwhile a real slave keeps working
and the master's /health stays fast."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

import harness
from cluster_harness import MASTER_HOST, cluster, fetch, probe, slave_host, write_key  # noqa: F401 - fixture
from rawhttp import closed_within

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

ALPN_CONTROL_PLANE = "safesquid-cluster/1"


def _control_plane_tls(addr: tuple[str, int], source: str) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN_CONTROL_PLANE])
    raw = socket.create_connection(addr, timeout=5, source_address=(source, 0))
    tls = context.wrap_socket(raw)
    assert tls.selected_alpn_protocol() == ALPN_CONTROL_PLANE
    return tls



def _banana_string(payload: bytes) -> bytes:
    """A banana string element (length in base-128 digits, low first, then 0x82)."""
    n, digits = len(payload), bytearray()
    while True:
        digits.append(n & 0x7F)
        n >>= 7
        if not n:
            break
    return bytes(digits) + b"\x82" + payload


def _send_until_closed(sock: ssl.SSLSocket, chunk: bytes, most: int) -> int:
    sent = 0
    try:
        while sent < most:
            sock.sendall(chunk)
            sent += len(chunk)
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    return sent


def _health_time(node) -> float:
    started = time.monotonic()
    status, _body = node.health(timeout=5)
    assert status == 200
    return time.monotonic() - started


def test_unauthenticated_peers_are_bounded_while_a_slave_keeps_working(cluster, origins):
    cluster.start_master(harness.make_policy(), keepalive=1)
    slave = cluster.add_slave(keepalive=1)
    before = cluster.wait_connected(slave.name)
    addr = (MASTER_HOST, cluster.master_port)
    junk = slave_host(6)
    mark = cluster.master.extended_mark()

    # Silent after TLS: closed at the 10 s deadline (counted from the TCP accept).
    silent = _control_plane_tls(addr, junk)
    silent_since = time.monotonic()

    # Valid banana strings, 46 MB of them, never a key proof: closed after the 64 KiB budget.
    with _control_plane_tls(addr, junk) as s:
        sent = _send_until_closed(s, _banana_string(b"x" * 16000), 46 << 20)
        # 64 KiB read, then closed; what else left this side sat in the kernel's socket buffers.
        print(f"\n{sent} bytes sent before the master closed the connection")
        assert sent < 20 << 20, f"the master took {sent} bytes from a peer that never authenticated"

    # While that went on, the slave served and the master's /health answered at once.
    assert fetch(slave, origins.url("/bounds-1")).status == 200
    assert _health_time(cluster.master) < 2.0

    # Protocol breaks: one error each, and the connection is closed.
    for mode in ("unknown-method", "deep", "refused-class"):
        outcome = probe(cluster.master_address, key_file=cluster.key_file, state_dir=cluster.workdir / f"p-{mode}",
                        source=junk, misbehave=mode, count=20)
        assert outcome["stage"] == "misbehaved", outcome
        errors = [a for a in outcome["answers"] if "error" in a]
        assert outcome["closed"], outcome
        assert len(errors) == len(outcome["answers"]), outcome
        assert not [a for a in outcome["answers"] if "ok" in a], outcome
    second = probe(cluster.master_address, key_file=cluster.key_file, state_dir=cluster.workdir / "p-2",
                   source=junk, misbehave="second-hello", count=2)
    assert "ok" in second["answers"][0] and "one key proof per connection" in second["answers"][1]["error"]

    waited = closed_within(silent, 13.0 - (time.monotonic() - silent_since))
    assert waited is not None, "a silent control-plane peer was kept past the deadline"
    silent.close()

    # The real slave never noticed.
    after = cluster.wait_connected(slave.name)
    assert after["connected_since"] == before["connected_since"]
    assert fetch(slave, origins.url("/bounds-2")).status == 200
    assert _health_time(cluster.master) < 2.0

    # Each source got at most one line per minute, and no traceback at all.
    lines = cluster.master.extended_lines(lambda line: junk in line, since=mark)
    assert 1 <= len(lines) <= 4, "\n".join(lines)
    text = cluster.master.extended_text()
    assert "Traceback" not in text and "Unhandled" not in text
    assert len(text.encode()) < 200_000


def test_failed_key_proofs_are_throttled_per_source(cluster, tmp_path):
    cluster.start_master(harness.make_policy(), keepalive=1)
    wrong = write_key(tmp_path / "wrong.key", "another-activation-key-of-the-cluster")
    source = slave_host(7)
    outcomes = [probe(cluster.master_address, key_file=wrong, state_dir=tmp_path / f"w{i}", source=source)
                for i in range(7)]
    assert all(o["stage"] in ("prove", "hello") for o in outcomes), outcomes
    assert "wrong activation key" in outcomes[0]["refused"]
    assert "too many failed key proofs" in outcomes[-1]["refused"]
    # Another address is not throttled: it still gets a key proof (and with the right key, in).
    ok = probe(cluster.master_address, key_file=cluster.key_file, state_dir=tmp_path / "ok", source=slave_host(8))
    assert ok["stage"] == "admitted", ok
    lines = cluster.master.extended_lines(lambda line: source in line)
    assert 1 <= len(lines) <= 2, lines
