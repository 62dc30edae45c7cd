"""Policy in a cluster of real processes: pushed to every slave at once, enforced while the master
is away, served from the slave's cache after a restart, and refused (503) when there is none.

Hosts a rule denies are under .invalid: they never resolve, so a request that is not denied gets
502 at once, and only the policy can turn it into 403 with the block page naming the rule.
"""

from __future__ import annotations

import threading
import time

import pytest

import harness
from cluster_harness import ClusterNode, cluster, fetch, status_of  # noqa: F401 - fixture
from harness import assert_blocked, assert_passed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PUSH_TARGET_S = 1.0


def deny_policy(*domains_by_rule: tuple[str, str], comment: str = "") -> dict:
    """Allow by default; each (rule, domain) pair denies that domain."""
    rules = [{"name": rule, "action": "deny", "reason": f"{domain} is denied by {rule}", "domains": [domain]}
             for rule, domain in domains_by_rule]
    document = harness.make_policy(rules=rules)
    if comment:
        document["comment"] = comment
    return document


def assert_enforces(slave: ClusterNode, origins, allowed_path: str, denied: tuple[str, str]) -> None:
    """The slave lets the origin through and blocks `denied` = (rule, domain) with its page."""
    response = fetch(slave, origins.url(allowed_path))
    assert response is not None, f"{slave.name}: no answer through the proxy"
    assert_passed(response)
    rule, domain = denied
    response = fetch(slave, f"http://{domain}/")
    assert response is not None, f"{slave.name}: no answer through the proxy"
    assert_blocked(response, rule)


# --------------------------------------------------------------------------------------------
# Push latency
# --------------------------------------------------------------------------------------------


def _watch_slave(slave: ClusterNode, version: int, denied_url: str, sent: float, deadline: float,
                 results: dict) -> None:
    """Record when this slave's /health first shows `version` and when its proxy first answers
    `denied_url` with 403, both in seconds after `sent`."""
    seen_version = seen_block = None
    while time.monotonic() < deadline and (seen_version is None or seen_block is None):
        if seen_version is None:
            try:
                status, body = slave.health(timeout=1.0)
                if status == 200 and body and body.get("policy_version") == version:
                    seen_version = time.monotonic() - sent
            except OSError:
                pass
        if seen_block is None and status_of(slave, denied_url, timeout=2.0) == 403:
            seen_block = time.monotonic() - sent
        time.sleep(0.005)
    results[slave.name] = (seen_version, seen_block)


def test_push_reaches_three_slaves_within_a_second(cluster, origins):
    cluster.start_master(deny_policy(("deny-old", "old-deny.invalid"), comment="version 1"))
    slaves = cluster.add_slaves(3)
    for slave in slaves:
        slave.wait_health(200, 10, check=lambda body: body["policy_version"] == 1)
        assert_enforces(slave, origins, "/before-push", ("deny-old", "old-deny.invalid"))
        # The domain about to be denied is only unresolvable now, not blocked.
        assert status_of(slave, "http://newly-denied.invalid/") == 502

    mark = cluster.master.extended_mark()
    results: dict[str, tuple[float | None, float | None]] = {}
    sent = cluster.push(deny_policy(("deny-old", "old-deny.invalid"), ("deny-new", "newly-denied.invalid"),
                                    comment="version 2"))
    deadline = sent + 5.0
    watchers = [threading.Thread(target=_watch_slave, args=(s, 2, "http://newly-denied.invalid/", sent,
                                                            deadline, results)) for s in slaves]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(10)

    report = ", ".join(
        f"{name}: health {'%.3f s' % v if v is not None else 'never'}, 403 {'%.3f s' % b if b is not None else 'never'}"
        for name, (v, b) in sorted(results.items()))
    print(f"\npush latency from SIGHUP on the master: {report}")
    for slave in slaves:
        version_at, block_at = results[slave.name]
        assert version_at is not None and block_at is not None, f"{slave.name} never applied version 2: {report}"
        assert max(version_at, block_at) <= PUSH_TARGET_S, f"{slave.name} took longer than {PUSH_TARGET_S} s: {report}"
        assert_blocked(fetch(slave, "http://newly-denied.invalid/"), "deny-new")
        assert_passed(fetch(slave, origins.url("/after-push")))

    cluster.master.wait_for_lines(lambda l: "policy version 2 pushed to 3 slave(s)" in l, since=mark,
                                  what="the push to all three slaves")
    for slave in slaves:
        cluster.wait_view(slave.name, lambda e: e["policy_version"] == 2 and not e["warnings"], 5,
                          "version 2 acknowledged")


# --------------------------------------------------------------------------------------------
# The master away
# --------------------------------------------------------------------------------------------


def test_slaves_keep_enforcing_when_the_master_is_killed(cluster, origins):
    cluster.start_master(deny_policy(("deny-a", "blocked-a.invalid")))
    slaves = cluster.add_slaves(2)
    marks = {s.name: s.extended_mark() for s in slaves}
    for slave in slaves:
        cluster.wait_view(slave.name, lambda e: e["policy_version"] == 1, 5, "version 1 acknowledged")

    cluster.master.kill()
    for slave in slaves:
        # Once the slave knows its master is gone, and again after, it serves version 1.
        slave.wait_for_lines(lambda l: "lost the connection to the master" in l and "version 1" in l,
                             since=marks[slave.name], timeout=10, what="the lost master noticed")
        for attempt in range(3):
            assert_enforces(slave, origins, f"/master-gone/{attempt}", ("deny-a", "blocked-a.invalid"))
        status, health = slave.health()
        assert status == 200, health
        assert health["policy_version"] == 1 and health["policy_source"], health
        assert health["ready"] is True
    assert all(s.alive() for s in slaves)


def test_restarted_slave_serves_its_cache_while_the_master_is_down(cluster, origins):
    cluster.start_master(deny_policy(("deny-cached", "cached-deny.invalid")))
    slave = cluster.add_slave(keepalive=1)
    slave.wait_health(200, 10, check=lambda body: body["policy_version"] == 1)
    assert slave.cache_path.exists()

    cluster.master.kill()
    slave.stop()
    mark = slave.extended_mark()
    slave.start(expect_health=200)
    status, health = slave.health()
    assert status == 200 and health["policy_source"] == "cache" and health["policy_version"] == 1, health
    assert_enforces(slave, origins, "/from-cache", ("deny-cached", "cached-deny.invalid"))
    record = slave.node.wait_for_url("cached-deny.invalid")
    assert record["policy_version"] == 1 and record["status"] == 403

    # The master comes back with a newer version: the slave takes it and says where it is from.
    harness.write_json_atomically(cluster.policy_path, deny_policy(("deny-cached", "cached-deny.invalid"),
                                                                   ("deny-later", "later-deny.invalid")))
    cluster.master.start()
    slave.wait_health(200, 15, check=lambda body: body["policy_version"] == 2 and body["policy_source"] == "master")
    assert_blocked(fetch(slave, "http://later-deny.invalid/"), "deny-later")
    # The event log said, at start-up, that the node served its cache.
    slave.wait_for_lines(lambda l: "cached policy version 1" in l, since=mark, timeout=2,
                         what="the cached policy announced")


def test_no_master_and_no_cache_refuses_to_proxy(cluster, origins):
    slave = cluster.slave()  # the master's port has nothing listening
    slave.launch()
    slave.wait_listening()
    body = slave.wait_health(503, 15)
    assert body["ready"] is False and body["policy_version"] is None, body
    response = fetch(slave, origins.url("/no-policy"))
    assert response is not None and response.status == 503, response
    assert "no policy" in response.text, response.text[:400]
    assert "text/html" in (response.header("content-type") or "")
    # It stays that way (and up) while the master is missing: retries, and still 503.
    slave.wait_for_lines(lambda l: "(attempt 3)" in l, timeout=15, what="a second retry")
    assert slave.alive() and slave.health()[0] == 503
    assert fetch(slave, origins.url("/no-policy-still")).status == 503
    assert not slave.cache_path.exists()
    slave.wait_for_lines(lambda l: "no cached policy" in l and "refuses to proxy" in l, timeout=2,
                         what="the no-policy warning")


def test_corrupt_cache_is_set_aside_until_the_master_answers(cluster, origins):
    slave = cluster.slave(keepalive=1)
    slave.cache_path.parent.mkdir(parents=True, exist_ok=True)
    junk = b'{"version": 3, "digest": "sha256:00", "policy": {"format": "saf\x00\xff garbage'
    slave.cache_path.write_bytes(junk)

    slave.launch()
    slave.wait_listening()
    slave.wait_health(503, 15)
    aside = sorted(slave.cache_path.parent.glob("current.json.corrupt-*"))
    assert len(aside) == 1, list(slave.cache_path.parent.iterdir())
    assert aside[0].read_bytes() == junk, "the corrupt cache must be kept as it was"
    assert not slave.cache_path.exists(), "the corrupt cache must not stay in place"
    response = fetch(slave, origins.url("/corrupt-cache"))
    assert response is not None and response.status == 503

    cluster.start_master(deny_policy(("deny-fresh", "fresh-deny.invalid")))
    slave.wait_health(200, 15, check=lambda body: body["policy_version"] == 1 and body["policy_source"] == "master")
    assert_enforces(slave, origins, "/after-master", ("deny-fresh", "fresh-deny.invalid"))
    assert slave.cache_path.exists()
    assert sorted(slave.cache_path.parent.glob("current.json.corrupt-*")) == aside, "the set-aside file must stay"
    lines = slave.wait_for_lines(lambda l: "corrupt" in l and "set aside" in l, timeout=2,
                                 what="the corrupt cache logged")
    assert aside[0].name in lines[0]
