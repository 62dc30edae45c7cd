"""Each slave's scanner state reaches the master's cluster view; a node-local ICAP address means
each node's own scanner."""

from __future__ import annotations

import pytest

import harness
from av_origin import AvOrigin
from cluster_harness import cluster  # noqa: F401 - fixture
from icap_servers import THREAT_NAME, Scanners, missing_tools

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_missing = missing_tools()
if _missing:
    pytest.skip(_missing, allow_module_level=True)


def test_slave_scanner_state_in_the_cluster_view(cluster, tmp_path):
    scanners = Scanners(tmp_path / "scanners").start()
    origin = AvOrigin()
    try:
        policy = harness.make_policy(antivirus={"enabled": True, "icap_services": [scanners.url]})
        cluster.start_master(policy)
        slave = cluster.add_slave()
        cluster.wait_connected(slave.name)
        view = cluster.wait_view(slave.name, lambda e: e["antivirus"] and e["antivirus"][0]["state"] == "ok", 20,
                                 "the slave's scanner shown as ok")
        (service,) = view["antivirus"]
        assert service["url"] == scanners.url and service["istag"] and service["reachable"] is True
        response = harness.proxy_request(slave, "GET", origin.url("/cluster-eicar?kind=eicar"))
        assert response.status == 403 and THREAT_NAME in response.text
        cluster.wait_view(slave.name, lambda e: e["antivirus"][0]["detections"] >= 1, 20, "the detection counted")
        scanners.icap.stop()
        # The next transfer finds the scanner gone (fail_mode closed: refused with 503).
        assert harness.proxy_request(slave, "GET", origin.url("/cluster-after?size=10")).status == 503
        view = cluster.wait_view(slave.name, lambda e: e["antivirus"][0]["state"] == "down", 30,
                                 "the stopped scanner shown as down")
        assert any("is down" in w for w in view["warnings"])
    finally:
        origin.stop()
        scanners.stop()
