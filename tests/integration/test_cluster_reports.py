"""Access records shipped from slaves to the master's report store: every request exactly once,
whatever happens to the master meanwhile, and the spool cap's drops counted and shown."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter

import pytest

import harness
from cluster_harness import ClusterNode, cluster, status_of  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


class Traffic(threading.Thread):
    """A bounded loop of GETs through the given slaves in turn, each URL unique.

    `answered` holds the URLs that got an HTTP response (whatever its status): the proxy logged
    each of them once. `failed` counts requests with no response at all."""

    def __init__(self, slaves: list[ClusterNode], url_for, limit: int, duration: float) -> None:
        super().__init__(daemon=True)
        self.slaves = slaves
        self.url_for = url_for
        self.limit = limit
        self.duration = duration
        self.answered: list[str] = []
        self.failed: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.duration
        for i in range(self.limit):
            if self.halt.is_set() or time.monotonic() > deadline:
                return
            slave = self.slaves[i % len(self.slaves)]
            url = self.url_for(i)
            status = status_of(slave, url, timeout=5.0)
            (self.answered if status is not None else self.failed).append(url)

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        harness.wait_until(lambda: len(self.answered) >= count or not self.is_alive(), timeout,
                           f"{count} answered requests")
        assert len(self.answered) >= count, f"traffic stopped after {len(self.answered)} requests"


def test_master_restart_during_traffic_stores_every_request_once(cluster, origins):
    cluster.start_master(harness.make_policy())
    slaves = cluster.add_slaves(2, keepalive=1)
    run = uuid.uuid4().hex[:12]
    marker = f"/ship-{run}/"

    traffic = Traffic(slaves, lambda i: origins.url(f"{marker}{i}"), limit=4000, duration=60)
    traffic.start()
    try:
        traffic.wait_for(150)
        cluster.master.kill()
        killed_at = len(traffic.answered)
        traffic.wait_for(killed_at + 150)
        cluster.master.start()
        restarted_at = len(traffic.answered)
        for slave in slaves:
            cluster.wait_connected(slave.name, timeout=15)
        traffic.wait_for(restarted_at + 150)
    finally:
        traffic.halt.set()
        traffic.join(15)
    assert not traffic.failed, f"{len(traffic.failed)} requests got no answer: {traffic.failed[:5]}"
    sent = Counter(traffic.answered)
    assert len(sent) == len(traffic.answered)
    print(f"\n{len(sent)} requests; master killed after {killed_at}, back after {restarted_at}")

    def stored():
        rows = cluster.report_rows(marker)
        return rows if len(rows) >= len(sent) else None

    try:
        rows = harness.wait_until(stored, 30, f"{len(sent)} requests in the master's report store", interval=0.25)
    except harness.HarnessError:
        rows = cluster.report_rows(marker)
        missing = set(sent) - {row[3] for row in rows}
        views = [cluster.node_view(s.name) for s in slaves]
        raise AssertionError(f"{len(missing)} of {len(sent)} requests never reached the report store "
                             f"(e.g. {sorted(missing)[:3]}); cluster view: {json.dumps(views)}") from None
    by_url = Counter(row[3] for row in rows)
    duplicates = {url: n for url, n in by_url.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} requests stored more than once, e.g. {list(duplicates.items())[:3]}"
    assert set(by_url) == set(sent), f"stored but never requested: {sorted(set(by_url) - set(sent))[:3]}"
    names = Counter((node, segment, seq) for node, segment, seq, _url, _status in rows)
    assert max(names.values()) == 1
    assert {row[0] for row in rows} == {s.name for s in slaves}
    assert all(row[4] == 200 for row in rows)
    # The master's reports API counts the same requests.
    status, found = cluster.api("GET", f"/api/v1/reports/requests?period=hour&domain={origins.host}&page_size=1")
    assert status == 200 and found["total"] == len(sent), (status, {k: found.get(k) for k in ("total", "error")})
    for slave in slaves:
        cluster.wait_view(slave.name, lambda e: e["backlog_records"] == 0 and e["dropped_records"] == 0, 10,
                          "an empty spool and nothing dropped")


SPOOL_CAP_BYTES = 16 * 1024
BURST = 10


def _spool_state(slave: ClusterNode) -> dict:
    try:
        return json.loads((slave.state_dir / "spool" / "spool-state.json").read_text())
    except (OSError, ValueError):
        return {}


def _settled_records(slave: ClusterNode) -> int:
    """Records the spool has sealed into segments (counted in their names) or dropped at its cap."""
    spool = slave.state_dir / "spool"
    sealed = sum(int(path.name.split(".")[1]) for path in spool.glob("*.seg"))
    return sealed + _spool_state(slave).get("dropped_records", 0)


def test_spool_cap_drops_oldest_records_and_the_master_shows_the_count(cluster, origins):
    cluster.start_master(harness.make_policy(), keepalive=1)
    # One process: this test reads the spool's files and checks the drops are the oldest records
    # in request order; with workers each worker's spool drops its own oldest (docs/ARCHITECTURE.md).
    slave = cluster.add_slave(keepalive=1, args=["--spool-cap-bytes", str(SPOOL_CAP_BYTES), "--workers", "1"])
    cluster.wait_connected(slave.name)
    cluster.master.kill()
    slave.wait_for_lines(lambda l: "lost the connection to the master" in l, what="the master gone")

    run = uuid.uuid4().hex[:12]
    requested: list[tuple[int, str]] = []
    for burst in range(40):
        for i in range(BURST):
            url = origins.url(f"/spool-{run}/{burst:02d}/{i}")
            assert status_of(slave, url) == 200
            requested.append((burst, url))
        # Records that stop arriving are sealed into a segment; the cap applies to sealed ones.
        harness.wait_until(lambda: _settled_records(slave) == len(requested), 10,
                           f"burst {burst} sealed or dropped", interval=0.05)
        if _spool_state(slave).get("dropped_records", 0) >= 2 * BURST:
            break
    dropped = _spool_state(slave)["dropped_records"]
    assert dropped >= 2 * BURST, f"the spool never went over its cap: {_spool_state(slave)}"

    cluster.master.start()
    view = cluster.wait_view(slave.name, lambda e: e["connected"] and e["dropped_records"] == dropped
                             and e["backlog_records"] == 0, 20, f"{dropped} dropped records shown")
    assert any("dropped" in w for w in view["warnings"]), view["warnings"]
    cluster.master.wait_for_lines(lambda l: slave.name in l and "dropped" in l and str(dropped) in l,
                                  what="the drop logged on the master")

    urls = [url for _burst, url in requested]
    rows = harness.wait_until(lambda: (r := cluster.report_rows(f"/spool-{run}/")) and len(r) + dropped >= len(urls)
                              and r, 20, "the records kept by the spool in the report store")
    stored = {row[3] for row in rows}
    assert len(rows) == len(stored), "a record was stored twice"
    assert len(stored) + dropped == len(urls), (
        f"{len(urls)} requested = {len(stored)} stored + {dropped} dropped does not hold: something else was lost")
    lost = [url for url in urls if url not in stored]
    assert lost == urls[: len(lost)], "the records dropped must be the oldest ones"
