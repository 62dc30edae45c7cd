"""Who the master admits on its control plane: the right key, an allowed address, a compatible
release and a name no live slave holds; and what garbage on the port does (nothing to the others)."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time

import pytest

import harness
from cluster_harness import MASTER_HOST, cluster, fetch, probe, slave_host, write_key  # noqa: F401 - fixture
from harness import assert_blocked
from rawhttp import closed_within
from safesquid_tw import __version__

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ALPN_CONTROL_PLANE = "safesquid-cluster/1"
# The portal port gives a connection 10 s to reach its protocol; a little slack on top.
HANGING_LIMIT_S = 17.0


def _is_traceback(line: str) -> bool:
    return "Traceback" in line or "Unhandled" in line


# --------------------------------------------------------------------------------------------
# The activation key
# --------------------------------------------------------------------------------------------


def test_wrong_activation_key_is_refused_and_the_slave_keeps_trying(cluster, tmp_path):
    cluster.start_master(harness.make_policy())
    wrong_key = write_key(tmp_path / "wrong.key", "not-the-cluster-activation-key")
    slave = cluster.slave("intruder", key_file=wrong_key, keepalive=1)
    slave.launch()
    slave.wait_listening()

    refusals = slave.wait_for_lines(lambda l: "refused this node" in l, count=2, timeout=20,
                                    what="two refused attempts")
    assert all("activation key" in line for line in refusals), refusals
    # The master logs failed proofs once per burst and source (the rest are counted).
    master_lines = cluster.master.wait_for_lines(lambda l: "refused slave intruder" in l, count=1, timeout=5,
                                                 what="the master's refusals")
    assert all("wrong activation key" in line and slave.host in line for line in master_lines), master_lines
    assert slave.alive()
    status, health = slave.health()
    assert status == 503 and health["policy_version"] is None, health
    assert not slave.cache_path.exists()
    view = cluster.node_view("intruder")
    assert view is None or view["connected"] is False

    # One clear line per attempt on each side: no tracebacks, no second account of the same refusal.
    slave_attempts = len(slave.extended_lines(lambda l: "refused this node" in l))
    problems = slave.extended_lines(lambda l: " ERROR " in l or " CRITICAL " in l)
    assert len(problems) == slave_attempts, f"more than one line per attempt on the slave: {problems}"
    assert 1 <= len(cluster.master.extended_lines(lambda l: "refused slave intruder" in l)) <= slave_attempts
    assert not [l for l in cluster.master.extended_text().splitlines() if _is_traceback(l)]
    assert not [l for l in slave.extended_text().splitlines() if _is_traceback(l)]


# --------------------------------------------------------------------------------------------
# The allow list
# --------------------------------------------------------------------------------------------


def allow_list_policy(*networks: str) -> dict:
    return harness.make_policy(access_restriction={"slave_allow_enabled": True, "slave_allow": list(networks)})


def test_address_not_on_the_allow_list_is_refused(cluster):
    policy = allow_list_policy(f"{slave_host(0)}/32")
    cluster.start_master(policy)
    cluster.add_slave("allowed")  # on 127.0.0.2
    outsider = cluster.slave("outsider", keepalive=1)  # on 127.0.0.3
    outsider.launch()
    outsider.wait_listening()
    lines = cluster.master.wait_for_lines(lambda l: "refused slave outsider" in l, count=1, timeout=15,
                                          what="the refusal of 127.0.0.3")
    assert "allow list" in lines[0] and outsider.host in lines[0], lines
    refused = outsider.wait_for_lines(lambda l: "refused this node" in l, timeout=5, what="the refusal")
    assert "allow list" in refused[0], refused
    assert outsider.health()[0] == 503
    assert cluster.node_view("allowed")["connected"] is True
    view = cluster.node_view("outsider")
    assert view is None or view["connected"] is False

    # Putting the address on the list lets it in on its next attempt.
    cluster.push(allow_list_policy(f"{slave_host(0)}/32", f"{slave_host(1)}/32"))
    cluster.wait_connected("outsider", timeout=15)
    outsider.wait_health(200, 10)


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------


def test_incompatible_version_is_refused_naming_both(cluster, tmp_path):
    cluster.start_master(harness.make_policy())
    source = slave_host(0)

    # The probe speaks the real protocol: with our own release it is admitted...
    admitted = probe(cluster.master_address, key_file=cluster.key_file, state_dir=tmp_path / "probe-ok",
                     node_name="probe-ok", source=source)
    assert admitted.get("stage") == "admitted", admitted

    # ...and as a 9.9.0 node it is refused at hello, with both versions named.
    mark = cluster.master.extended_mark()
    refused = probe(cluster.master_address, key_file=cluster.key_file, state_dir=tmp_path / "probe-new",
                    product="9.9.0", node_name="probe-new", source=source)
    assert refused.get("stage") == "hello", refused
    message = refused.get("refused", "")
    assert "9.9.0" in message and __version__ in message, refused
    line = cluster.master.wait_for_lines(lambda l: "refused slave probe-new" in l, since=mark,
                                         what="the refusal on the master")[0]
    assert "9.9.0" in line and __version__ in line and source in line, line
    assert cluster.node_view("probe-new") is None


# --------------------------------------------------------------------------------------------
# Garbage on the control port
# --------------------------------------------------------------------------------------------



def _client_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _control_plane_tls(addr: tuple[str, int], source: str) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN_CONTROL_PLANE])
    raw = socket.create_connection(addr, timeout=5, source_address=(source, 0))
    tls = context.wrap_socket(raw)
    assert tls.selected_alpn_protocol() == ALPN_CONTROL_PLANE
    return tls


def test_garbage_on_the_control_port_harms_no_slave(cluster, origins):
    cluster.start_master(harness.make_policy(), keepalive=1)
    slave = cluster.add_slave(keepalive=1)
    before = cluster.wait_connected(slave.name)
    addr = (MASTER_HOST, cluster.master_port)
    junk_source = slave_host(5)

    def connect() -> socket.socket:
        return socket.create_connection(addr, timeout=5, source_address=(junk_source, 0))

    # Half a TLS handshake, and binary garbage with no line end, both left hanging: the port's
    # handshake deadline (10 s) must end them, checked at the end of the test.
    half = connect()
    hello = _client_hello()
    half.sendall(hello[: len(hello) // 2])
    binary = connect()
    binary.sendall(b"\x00\x01garbage" + os.urandom(2048).replace(b"\n", b"."))
    hanging_since = time.monotonic()

    closed = {}
    with connect() as s:  # a TLS record header followed by nonsense
        s.sendall(b"\x16\x03\x01\x02\x00" + os.urandom(512))
        closed["a broken TLS record"] = closed_within(s, 5)
    with _control_plane_tls(addr, junk_source) as s:  # inside TLS, not Perspective Broker
        s.sendall(os.urandom(4096))
        closed["junk inside the control-plane TLS"] = closed_within(s, 5)
    with _control_plane_tls(addr, junk_source) as s:  # a banana string claiming to be enormous
        s.sendall(b"\x7f\x7f\x7f\x7f\x7f\x82" + b"x" * 1024)
        closed["an oversized banana string"] = closed_within(s, 5)
    with _control_plane_tls(addr, junk_source) as s:  # a PB call before any login: nothing to call
        s.sendall(b"\x01\x80\x04\x82call" + os.urandom(64))
        closed["a PB message out of nowhere"] = closed_within(s, 5)
    assert all(v is not None for v in closed.values()), f"left open: {[k for k, v in closed.items() if v is None]}"

    # A flood: many connections at once, some talking nonsense, some silent.
    flood: list[socket.socket] = []
    errors: list[BaseException] = []

    def open_many(count: int) -> None:
        for i in range(count):
            try:
                s = connect()
                if i % 2:
                    s.sendall(os.urandom(64))
                flood.append(s)
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=open_many, args=(75,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(flood) >= 250, f"only {len(flood)} flood connections opened: {errors[:3]}"
    started = time.monotonic()
    assert cluster.master.health(timeout=5)[0] == 200
    assert time.monotonic() - started < 2, "the master answers slowly under the flood"
    for s in flood:
        s.close()

    # The real slave never noticed, and still gets the next push at once.
    after = cluster.wait_connected(slave.name)
    assert after["connected_since"] == before["connected_since"], "the slave was disconnected by the garbage"
    sent = cluster.push(harness.make_policy(rules=[{"name": "after-garbage", "action": "deny",
                                                    "domains": ["after-garbage.invalid"]}]))
    slave.wait_health(200, 3, check=lambda body: body["policy_version"] == 2)
    print(f"\npush after the garbage reached the slave in {time.monotonic() - sent:.3f} s")
    assert_blocked(fetch(slave, "http://after-garbage.invalid/"), "after-garbage")

    hanging = {}
    for what, sock in (("half a TLS handshake", half), ("binary garbage", binary)):
        remaining = HANGING_LIMIT_S - (time.monotonic() - hanging_since)
        hanging[what] = closed_within(sock, max(remaining, 0.1))
        sock.close()
    assert all(v is not None for v in hanging.values()), (
        f"kept open for {HANGING_LIMIT_S} s: {[k for k, v in hanging.items() if v is None]}")
    assert cluster.master.alive()
    assert not [l for l in cluster.master.extended_text().splitlines() if "Traceback" in l]


# --------------------------------------------------------------------------------------------
# Node names
# --------------------------------------------------------------------------------------------


def test_second_slave_with_the_same_name_is_refused_until_the_first_is_gone(cluster):
    cluster.start_master(harness.make_policy(), keepalive=1)
    first = cluster.add_slave("first", node_name="twin", keepalive=1)
    cluster.wait_view("twin", lambda e: e["connected"] and e["address"] == first.host, 10, "the first twin")

    second = cluster.slave("second", node_name="twin", keepalive=1)
    second.launch()
    second.wait_listening()
    refused = second.wait_for_lines(lambda l: "refused this node" in l, timeout=15, what="the clash refusal")
    assert "'twin'" in refused[0] and ("clash" in refused[0] or "already connected" in refused[0]), refused
    master_line = cluster.master.wait_for_lines(lambda l: "refused slave twin" in l, what="the clash on the master")[0]
    assert "clash" in master_line and first.host in master_line and second.host in master_line, master_line
    assert second.alive() and second.health()[0] == 503
    assert cluster.node_view("twin")["address"] == first.host
    assert first.health()[0] == 200

    first.kill()
    taken = time.monotonic()
    cluster.wait_view("twin", lambda e: e["connected"] and e["address"] == second.host, 15,
                      "the second twin taking over")
    second.wait_health(200, 10)
    print(f"\nthe second slave took the name over {time.monotonic() - taken:.1f} s after the first died")
