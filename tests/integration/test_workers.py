"""A node with --workers 2: worker processes share the proxy port, follow the policy, are
replaced when they die, ship their records once, and stop gracefully (real twistd, loopback)."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections import Counter

import pytest

import harness
from cluster_harness import cluster  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WORKERS = ["--workers", "2"]


def workers_of(node) -> list[dict]:
    status, health = node.health()
    assert health is not None, status
    return health["workers"]


def wait_workers(node, check, what: str, timeout: float = 30.0) -> list[dict]:
    def ok():
        try:
            workers = workers_of(node)
        except (AssertionError, OSError, harness.HarnessError):
            return None
        return workers if len(workers) == 2 and check(workers) else None

    return harness.wait_until(ok, timeout, what, interval=0.1)


def running_with_policy(version: int):
    return lambda ws: all(w["state"] == "running" and w["policy_version"] == version for w in ws)


class Traffic(threading.Thread):
    """Requests one after another on fresh connections until halted; every outcome kept."""

    def __init__(self, node, url_for) -> None:
        super().__init__(daemon=True)
        self.node, self.url_for = node, url_for
        self.halt = threading.Event()
        self.answered: list[str] = []
        self.failed: list[tuple[str, str]] = []

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            url = self.url_for(i)
            i += 1
            try:
                response = harness.proxy_request(self.node, "GET", url, timeout=10)
            except Exception as e:  # every failure is the test's business
                self.failed.append((url, repr(e)))
                continue
            if response.status == 200:
                self.answered.append(url)
            else:
                self.failed.append((url, str(response.status)))

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        harness.wait_until(lambda: len(self.answered) >= count or not self.is_alive(), timeout,
                           f"{count} answered requests")


def test_two_workers_share_the_port_and_both_take_connections(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy(), args=WORKERS, name="workers")
    workers = wait_workers(node, running_with_policy(1), "two running workers with version 1")
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and node.pid not in pids
    for i in range(200):
        harness.assert_passed(harness.proxy_request(node, "GET", origins.url(f"/workers/spread/{i}")))
    counts = wait_workers(node, lambda ws: sum(w["requests"] for w in ws) >= 200, "the workers' counts")
    by_pid = {w["pid"]: w["requests"] for w in counts}
    print(f"\nrequests per worker: {by_pid}")
    assert all(n > 0 for n in by_pid.values()), f"a worker took no connection: {by_pid}"
    # Every record reached the node's one access log.
    harness.wait_until(lambda: len([r for r in node.access_records() if "/workers/spread/" in r["url"]]) == 200,
                       10, "200 access records")


def test_a_killed_worker_is_replaced_while_requests_keep_succeeding(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy(), args=WORKERS, name="workers")
    workers = wait_workers(node, running_with_policy(1), "two running workers")
    traffic = Traffic(node, lambda i: origins.url(f"/workers/kill/{i}"))
    traffic.start()
    try:
        traffic.wait_for(50)
        victim = workers[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        replaced = wait_workers(node, lambda ws: victim not in {w["pid"] for w in ws}
                                and all(w["state"] == "running" and w["policy_version"] == 1 for w in ws),
                                "the killed worker replaced")
        at = len(traffic.answered)
        traffic.wait_for(at + 50)
    finally:
        traffic.halt.set()
        traffic.join(15)
    # A request the killed worker had accepted dies with it (its connection is reset); every other
    # request, before and after, is answered.
    assert len(traffic.failed) <= 1, traffic.failed[:5]
    assert len({w["pid"] for w in replaced}) == 2
    status, health = node.health()
    assert status == 200
    node.wait_for_extended(lambda line: "restarting it in" in line and str(victim) in line)


def test_a_policy_reload_reaches_every_worker(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy(), args=WORKERS, name="workers")
    workers = wait_workers(node, running_with_policy(1), "two running workers")
    node.reload(harness.make_policy(rules=[{"name": "no-blocked", "action": "deny", "domains": ["blocked.test"]}]))
    wait_workers(node, running_with_policy(2), "both workers on version 2")
    for worker in workers:  # SIGHUP reached each of them
        node.wait_for_extended(lambda line, pid=worker["pid"]: f"worker {pid}: SIGHUP from the node" in line)
    for _ in range(10):  # whichever worker takes the connection
        harness.assert_blocked(harness.proxy_request(node, "GET", "http://blocked.test/"), "no-blocked")


def test_graceful_stop_under_load_fails_no_request(node_factory, origins):
    node = node_factory.start(policy=harness.make_policy(), args=[*WORKERS, "--stop-grace", "1"], name="workers")
    wait_workers(node, running_with_policy(1), "two running workers")
    traffic = Traffic(node, lambda i: origins.url(f"/workers/stop/{i}"))
    traffic.start()
    traffic.wait_for(50)
    # Slow requests in flight in the workers when the stop begins: each must still be answered.
    slow: list[int | str] = []

    def slow_request(i: int) -> None:
        try:
            slow.append(harness.proxy_request(node, "GET", origins.url(f"/slow?delay=2&i={i}"), timeout=20).status)
        except Exception as e:
            slow.append(repr(e))

    pending = [threading.Thread(target=slow_request, args=(i,), daemon=True) for i in range(6)]
    for thread in pending:
        thread.start()
    harness.wait_until(lambda: sum(w["connections"] for w in workers_of(node)) >= 6, 10,
                       "the slow requests in the workers")
    node.signal(signal.SIGTERM)
    # During the stop grace /health says 503 and the workers still serve; the traffic thread
    # stops itself when the node refuses (a client behind a balancer would have moved away).
    harness.wait_until(lambda: node.health()[0] == 503, 10, "/health 503 while stopping")
    traffic.halt.set()
    traffic.join(15)
    assert node.process.wait(30) in (0, -signal.SIGTERM)  # twistd re-raises SIGTERM after a clean stop
    for thread in pending:
        thread.join(20)
    assert slow == [200] * 6, slow
    assert not traffic.failed, traffic.failed[:5]
    urls = [r["url"] for r in node.access_records() if "/workers/stop/" in r["url"]]
    assert Counter(urls) == Counter(traffic.answered)


def test_records_from_every_worker_reach_the_master_exactly_once(cluster, origins):
    cluster.start_master(harness.make_policy())
    slave = cluster.add_slave(args=WORKERS)
    wait_workers(slave.node, running_with_policy(1), "the slave's two workers")
    marker = f"/workers-ship-{uuid.uuid4().hex[:12]}/"
    sent = []
    for i in range(120):
        url = origins.url(f"{marker}{i}")
        harness.assert_passed(harness.proxy_request(slave.node, "GET", url))
        sent.append(url)
    workers = wait_workers(slave.node, lambda ws: sum(w["requests"] for w in ws) >= 120, "the workers' counts")
    assert all(w["requests"] > 0 for w in workers), workers

    def stored():
        rows = cluster.report_rows(marker)
        return rows if len(rows) >= len(sent) else None

    rows = harness.wait_until(stored, 30, "every request in the master's report store", interval=0.25)
    by_url = Counter(row[3] for row in rows)
    assert by_url == Counter(sent), "each request stored exactly once"
    # A push reaches both workers.
    cluster.push(harness.make_policy(rules=[{"name": "r", "action": "deny", "domains": ["x.test"]}]))
    wait_workers(slave.node, running_with_policy(2), "both workers on the pushed version")
    # The master's cluster view shows each worker and its version.
    cluster.wait_view(slave.name, lambda e: len(e["workers"]) == 2 and all(
        w["policy_version"] == 2 and w["state"] == "running" for w in e["workers"]), 15,
        "both workers on version 2 in the cluster view")


def test_a_clients_connection_limit_holds_for_the_node_across_workers(node_factory, origins):
    from test_edge_clients import _served_from, build_request, closed_at_once, connect_from, raw_from

    node = node_factory.start(policy=harness.make_policy(),
                              args=[*WORKERS, "--max-connections-per-client", "6"], name="workers")
    wait_workers(node, running_with_policy(1), "two running workers")

    def hold_six() -> tuple[list, list[dict]]:
        held = []
        for i in range(6):
            sock = connect_from("127.0.0.31", node.proxy)
            sock.sendall(build_request("GET", origins.url(f"/workers/limit/{i}")))
            sock.settimeout(10)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            held.append(sock)
        workers = wait_workers(node, lambda ws: sum(w["connections"] for w in ws) == 6, "six held connections")
        return held, workers

    # The limit is the node's: it must hold while the client's connections sit in both workers.
    for _attempt in range(10):
        held, workers = hold_six()
        if all(w["connections"] > 0 for w in workers):
            break
        for sock in held:
            sock.close()
        wait_workers(node, lambda ws: sum(w["connections"] for w in ws) == 0, "the connections closed")
    print(f"\nheld connections per worker: {[w['connections'] for w in workers]}")
    try:
        assert all(w["connections"] > 0 for w in workers), workers
        for _ in range(4):  # whichever worker takes the seventh, it is refused
            assert closed_at_once("127.0.0.31", node.proxy)
        harness.assert_passed(raw_from("127.0.0.32", node.proxy, build_request("GET", origins.url("/workers/limit/other"))))
        harness.wait_until(lambda: node.health()[1]["edge"]["per_client_refused"] == 4, 10, "4 refusals counted")
    finally:
        for sock in held:
            sock.close()
    harness.wait_until(lambda: _served_from("127.0.0.31", node, origins), 10, "127.0.0.31 served again")
