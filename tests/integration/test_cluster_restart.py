"""A master restart, over real processes: the master remembers its nodes (listed as not
connected until they return, removable by an administrator), slaves are back within 5 s, and a
slave's /health tells its master connection while its status code only says it can serve."""

from __future__ import annotations

import time

import pytest

import harness
from cluster_harness import cluster, fetch  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def test_master_restart_remembers_nodes_and_slaves_return_within_5_s(cluster, origins):
    cluster.start_master(harness.make_policy())
    live, departed = cluster.add_slaves(2, keepalive=10)
    for slave in (live, departed):
        cluster.wait_connected(slave.name)
    status, health = live.health()
    assert status == 200 and health["master"]["connected"] is True and health["master"]["since"]
    assert health["policy_version"] == 1 and health["policy_age_s"] >= 0
    assert health["spool"]["backlog_records"] >= 0 and health["spool"]["writable"] is True

    departed.stop()
    cluster.wait_connected(departed.name, connected=False)
    cluster.master.kill()
    health = harness.wait_until(lambda: (h := live.health()) and not h[1]["master"]["connected"] and h, 10,
                                "the slave's /health saying the master is away")
    assert health[0] == 200, "a slave that lost its master still serves: /health stays 200"
    assert fetch(live, origins.url("/while-master-away")).status == 200
    # Let the back-off grow to its cap before the master returns.
    live.wait_for_lines(lambda line: "(attempt 5)" in line, timeout=30, what="five attempts to reach the master")

    cluster.master.start()
    back = time.monotonic()
    view = {n["name"]: n for n in cluster.cluster_view()["nodes"]}
    assert set(view) == {live.name, departed.name}, view
    assert view[departed.name]["connected"] is False and "not connected" in view[departed.name]["warnings"]
    cluster.wait_connected(live.name, timeout=10)
    took = time.monotonic() - back
    print(f"\nslave reconnected {took:.2f} s after the master was back")
    assert took <= 5.0, f"the slave took {took:.1f} s to reconnect"
    assert live.health()[1]["master"]["connected"] is True

    status, body = cluster.api("DELETE", f"/api/v1/cluster/{departed.name}")
    assert status == 200 and body["removed"] is True
    assert [n["name"] for n in cluster.cluster_view()["nodes"]] == [live.name]
    status, body = cluster.api("DELETE", f"/api/v1/cluster/{live.name}")
    assert status == 409, body
    audit = (cluster.master.state_dir / "logs" / "audit.log").read_text()
    assert '"remove_node"' in audit and departed.name in audit
