"""etc/haproxy.cfg with `send-proxy-v2` in front of a node's PROXY listener: the client's own
address (curl bound to its own 127.0.0.x source) is the address in the node's access record, and
an access rule on that address takes effect while another source is allowed.

HAProxy runs the sample (addresses changed, system-only lines dropped, as in test_haproxy.py)
under an ordinary open-files limit of 1024, which the sample's connection sizing must start under.
"""

from __future__ import annotations

import pytest

import harness
from cluster_harness import free_ports
from harness import curl, echo_headers, make_policy
from test_haproxy import BALANCER_HOST, HAPROXY, HAProxy, render_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120),
              pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (scripts/test installs it with apt-get)")]

HOST = harness.NODE_HOST
BLOCKED_CLIENT = "127.0.0.9"
ALLOWED_CLIENT = "127.0.0.8"


@pytest.fixture
def balanced_node(node_factory, tmp_path):
    proxy_port, portal_port = free_ports(HOST, 2)
    policy = make_policy([{"name": "no-nine", "action": "deny", "reason": "this client is blocked",
                           "clients": [f"{BLOCKED_CLIENT}/32"]}])
    node = node_factory.start(policy=policy, args=[
        "--listen", f"haproxy:tcp:{proxy_port}:interface={HOST}",
        # HAProxy connects from loopback's primary address.
        "--proxy-protocol-from", "127.0.0.1/32",
        "--portal", f"tcp:{portal_port}:interface={HOST}",
    ])
    bind_port, stats_port = free_ports(BALANCER_HOST, 2)
    bind = (BALANCER_HOST, bind_port)
    admin = tmp_path / "haproxy-admin.sock"
    # The sample names two servers: both are this node.
    target = ((HOST, proxy_port), (HOST, portal_port))
    config = render_config({"slave1": target, "slave2": target}, bind, (BALANCER_HOST, stats_port), admin)
    assert "send-proxy-v2" in config
    balancer = HAProxy(tmp_path, config, bind, admin, file_limit=1024)
    try:
        balancer.wait_states({"slave1": "UP", "slave2": "UP"}, 15)
        yield node, balancer
    finally:
        balancer.stop()


def test_the_clients_own_address_reaches_rules_and_records_through_haproxy(balanced_node, origins):
    node, balancer = balanced_node
    info = balancer.info()
    assert int(info["Ulimit-n"]) <= 1024 and 0 < int(info["Maxconn"]) < 1024, info
    proxy = f"http://{balancer.bind[0]}:{balancer.bind[1]}"

    allowed = curl("--interface", ALLOWED_CLIENT, "-x", proxy, origins.url("/haproxy/allowed"))
    assert allowed.status == 200, allowed.stderr
    assert echo_headers(allowed.json(), "x-forwarded-for") == [ALLOWED_CLIENT]
    assert node.wait_for_url("/haproxy/allowed")["client"] == ALLOWED_CLIENT

    blocked = curl("--interface", BLOCKED_CLIENT, "-x", proxy, origins.url("/haproxy/blocked"))
    assert blocked.status == 403 and b"no-nine" in blocked.body, blocked.stderr
    record = node.wait_for_url("/haproxy/blocked")
    assert record["client"] == BLOCKED_CLIENT and record["action"] == "deny" and record["rule"] == "no-nine"

    # Nothing was served as the balancer's address, and no header was refused.
    assert not [r for r in node.access_records() if r["client"] in ("127.0.0.1", BALANCER_HOST)]
    assert node.health()[1]["edge"]["proxy_header_invalid"] == 0
