"""Policy reload on SIGHUP: the new version applies to new requests, requests in flight
finish, and a policy that does not validate is refused while the running one stays."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest

import harness
from harness import RawConnection, assert_blocked, assert_passed, build_request, proxy_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]



def blocking_policy() -> dict:
    return harness.make_policy(rules=[{"name": "reload-block", "action": "deny", "reason": "Blocked after reload",
                                       "url_patterns": ["*/reload-target*"]}])


def test_sighup_reload(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy(), name="reload")
    assert_passed(proxy_request(node, "GET", origins.url("/reload-target?v=1")))
    assert node.wait_for_url("/reload-target?v=1")["policy_version"] == 1

    node.reload(blocking_policy())
    harness.wait_until(lambda: proxy_request(node, "GET", origins.url("/reload-target?v=2")).status == 403,
                       10, "the reloaded policy to block", interval=0.1)
    # The polls above may have been answered (and recorded) under version 1: ask once more.
    assert_blocked(proxy_request(node, "GET", origins.url("/reload-target?v=2-after")), "reload-block")
    assert node.wait_for_url("/reload-target?v=2-after")["policy_version"] == 2
    status, health = node.health()
    assert status == 200 and health["policy_version"] == 2

    # A policy that does not validate is refused; version 2 keeps running.
    mark = node.extended_mark()
    broken = blocking_policy()
    broken["access"]["rules"][0]["domains"] = ["*."]
    node.reload(broken)
    line = node.wait_for_extended(lambda l: "domains[0]" in l, since=mark, timeout=10,
                                  what="the reason the broken policy was refused")
    assert "reload-block" in line or "access.rules[0]" in line
    assert node.alive()
    assert_blocked(proxy_request(node, "GET", origins.url("/reload-target?v=broken")), "reload-block")
    assert node.wait_for_url("/reload-target?v=broken")["policy_version"] == 2
    assert node.health()[1]["policy_version"] == 2

    # Unparsable JSON is refused the same way.
    mark = node.extended_mark()
    node.reload("{ not json")
    node.wait_for_extended(lambda l: "line 1" in l or "json" in l.lower(), since=mark, timeout=10,
                           what="the reason the unparsable policy was refused")
    assert node.health()[1]["policy_version"] == 2


def test_download_in_flight_survives_a_reload(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy(), name="reload-inflight")
    chunks, size = 30, 10_000
    with RawConnection(node.proxy, timeout=20) as conn:
        conn.send(build_request("GET", origins.url(f"/trickle?chunks={chunks}&size={size}&interval=0.1")))
        status, _headers = conn.read_head()
        assert status == 200
        received = len(conn.buffer)
        conn.buffer.clear()
        node.reload(blocking_policy())
        harness.wait_until(lambda: node.health()[1]["policy_version"] == 2, 5, "policy version 2")
        assert received < chunks * size, "the download finished before the reload: the test proved nothing"
        deadline = time.monotonic() + 20
        while received < chunks * size and time.monotonic() < deadline:
            data = conn.read_some(timeout=5)
            assert data, f"the download was dropped after {received} bytes"
            received += len(data)
    assert received == chunks * size
    assert_blocked(proxy_request(node, "GET", origins.url("/reload-target")), "reload-block")


def test_sighup_without_change_keeps_serving(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy(), name="reload-same")
    node.signal(signal.SIGHUP)
    harness.wait_until(lambda: proxy_request(node, "GET", origins.url("/after-hup")).status == 200, 10,
                       "a request after SIGHUP")
    assert node.alive()


def test_a_restart_keeps_what_the_portal_applied_over_an_unchanged_file(tmp_path, origins):
    """The policy file is applied at start only when it changed since it was last loaded: a
    restart must not undo a version an administrator applied through the portal or the API."""
    node = harness.start_node(tmp_path, policy=harness.make_policy(), name="restart")
    try:
        token = (node.state_dir / "api-token").read_text().strip()
        document = harness.make_policy(rules=[{"name": "from-the-api", "action": "deny", "domains": ["api.invalid"]}])
        request = urllib.request.Request(
            node.portal_url + "/api/v1/policy", method="POST",
            data=json.dumps({"document": document, "comment": "applied through the API"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status in (200, 201)
        assert node.health()[1]["policy_version"] == 2
        node.stop()
        node = harness.start_node(tmp_path, name="restart", args=["--policy", str(tmp_path / "restart-policy.json")])
        assert node.health()[1]["policy_version"] == 2
        assert "unchanged since it was loaded as version 1" in node.extended_text()
        assert harness.proxy_request(node, "GET", "http://api.invalid/").status == 403
    finally:
        node.stop()
