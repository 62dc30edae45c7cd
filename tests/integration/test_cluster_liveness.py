"""Keepalives both ways: a peer that vanishes without closing its connection (SIGSTOP) is noticed
within a bounded time, and the pair comes back together once it runs again (SIGCONT)."""

from __future__ import annotations

import time

import pytest

import harness
from cluster_harness import cluster, status_of  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

KEEPALIVE_S = 1.0
# The master pings every interval and gives up on a slave silent for 3 of them; one more
# interval for the tick that notices, and a little slack for the machine.
GONE_WITHIN_S = 4 * KEEPALIVE_S + 1.0


def test_frozen_slave_is_marked_gone_and_comes_back(cluster, origins):
    cluster.start_master(harness.make_policy(), keepalive=KEEPALIVE_S)
    slave = cluster.add_slave(keepalive=KEEPALIVE_S)
    cluster.wait_connected(slave.name)
    mark = cluster.master.extended_mark()

    slave.pause()
    paused = time.monotonic()
    try:
        view = cluster.wait_connected(slave.name, timeout=GONE_WITHIN_S + 5, connected=False)
        gone_after = time.monotonic() - paused
        print(f"\na frozen slave was marked gone {gone_after:.2f} s after SIGSTOP (keepalive {KEEPALIVE_S:g} s)")
        assert gone_after <= GONE_WITHIN_S, f"took {gone_after:.2f} s, more than {GONE_WITHIN_S} s"
        assert "not connected" in view["warnings"] and view["disconnected_at"] is not None
        cluster.master.wait_for_lines(lambda l: slave.name in l and "marked gone" in l, since=mark, timeout=2,
                                      what="the slave marked gone")
    finally:
        slave.resume()
    cluster.wait_connected(slave.name, timeout=15)
    slave.wait_health(200, 5)
    assert status_of(slave, origins.url("/after-sigcont")) == 200


def test_frozen_master_is_noticed_and_the_slave_keeps_serving(cluster, origins):
    cluster.start_master(harness.make_policy(), keepalive=KEEPALIVE_S)
    slave = cluster.add_slave(keepalive=KEEPALIVE_S)
    before = cluster.wait_connected(slave.name)
    mark = slave.extended_mark()

    cluster.master.pause()
    paused = time.monotonic()
    try:
        # A call the master does not answer times out (twice the keepalive, at least 5 s).
        slave.wait_for_lines(lambda l: "lost the connection to the master" in l, since=mark, timeout=10,
                             what="the frozen master noticed")
        print(f"\nthe slave noticed a frozen master after {time.monotonic() - paused:.2f} s")
        assert status_of(slave, origins.url("/master-frozen")) == 200
        assert slave.health()[0] == 200
    finally:
        cluster.master.resume()
    after = cluster.wait_view(slave.name, lambda e: e["connected"] and e["connected_since"] != before["connected_since"],
                              15, "a fresh connection after the master thawed")
    assert after["policy_version"] == 1
