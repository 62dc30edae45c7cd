"""A download the client abandons is recorded as `transfer` = "client_aborted" (not a plain 200),
a complete one as "complete", and a refused origin as action `error`; the standalone node's
reports count them apart."""

from __future__ import annotations

import json
import urllib.request

import pytest

import harness
from harness import RawConnection, build_request, proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_abandoned_download_is_marked_client_aborted_and_counted(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy())
    with RawConnection(node.proxy, timeout=10) as conn:
        conn.send(build_request("GET", origins.url("/trickle?chunks=50&size=10000&interval=0.1")))
        status, _headers = conn.read_head()
        assert status == 200
    aborted = node.wait_for_access(lambda r: "/trickle" in r["url"], timeout=10)
    assert aborted["status"] == 200 and aborted["transfer"] == "client_aborted"
    assert aborted["bytes_out"] < 50 * 10000

    assert proxy_request(node, "GET", origins.url("/whole")).status == 200
    whole = node.wait_for_url("/whole")
    assert whole["transfer"] == "complete"

    refused = proxy_request(node, "GET", f"http://127.0.0.1:{harness.closed_port()}/nothing-here")
    assert refused.status == 502
    error = node.wait_for_url("/nothing-here")
    assert error["action"] == "error" and error["transfer"] == "complete"

    token = (node.state_dir / "api-token").read_text().strip()

    def dashboard():
        request = urllib.request.Request(node.portal_url + "/api/v1/reports/dashboard?period=hour",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            totals = json.loads(answer.read())["totals"]
        return totals if totals["requests"] >= 3 else None

    totals = harness.wait_until(dashboard, 20, "the records in the node's reports")
    assert totals["client_aborted"] >= 1 and totals["errors"] >= 1
    assert totals["allowed"] == totals["requests"] - totals["blocked"] - totals["errors"]
