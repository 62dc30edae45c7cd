"""Durable access records over real processes: a slave SIGKILLed under load loses no finished
request's record and stores none twice; a spool directory that cannot be written keeps the node
proxying with records held in memory (bounded, drops counted), visible in /health, the cluster
view and extended.log, and everything held ships once writing works again."""

from __future__ import annotations

import shutil
import subprocess
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest

import harness
from cluster_harness import ClusterNode, cluster, status_of  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Load(threading.Thread):
    """One client: GETs of unique URLs through a slave until halted; `answered` holds the URLs
    whose whole response arrived, `failed` those that did not."""

    def __init__(self, slave: ClusterNode, url_for, limit: int = 5000) -> None:
        super().__init__(daemon=True)
        self.slave, self.url_for, self.limit = slave, url_for, limit
        self.answered: list[str] = []
        self.failed: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        for i in range(self.limit):
            if self.halt.is_set():
                return
            url = self.url_for(i)
            status = status_of(self.slave, url, timeout=5.0)
            (self.answered if status is not None else self.failed).append(url)


def _stored(cluster, marker: str, at_least: int, timeout: float = 40.0) -> list[tuple]:
    def enough():
        rows = cluster.report_rows(marker)
        return rows if len(rows) >= at_least else None

    try:
        return harness.wait_until(enough, timeout, f"{at_least} records in the master's store", interval=0.25)
    except harness.HarnessError:
        return cluster.report_rows(marker)


def test_sigkill_under_load_loses_no_finished_request(cluster, origins):
    cluster.start_master(harness.make_policy())
    [slave] = cluster.add_slaves(1, keepalive=1)
    marker = f"/kill-{uuid.uuid4().hex[:12]}/"
    loads = [Load(slave, lambda i, k=k: origins.url(f"{marker}c{k}/{i}")) for k in range(4)]
    for load in loads:
        load.start()
    try:
        harness.wait_until(lambda: sum(len(x.answered) for x in loads) >= 600, 60, "600 answered requests")
        slave.kill()  # SIGKILL in the middle of the load
    finally:
        for load in loads:
            load.halt.set()
        for load in loads:
            load.join(15)
    answered = [url for load in loads for url in load.answered]
    in_flight = {url for load in loads for url in load.failed}
    assert len(set(answered)) == len(answered)
    slave.restart()
    rows = _stored(cluster, marker, len(answered))
    by_url = Counter(row[3] for row in rows)
    missing = set(answered) - set(by_url)
    print(f"\n{len(answered)} answered, {len(in_flight)} cut off by the kill, {len(rows)} stored")
    assert not missing, f"{len(missing)} finished requests have no record, e.g. {sorted(missing)[:3]}"
    duplicates = {url: n for url, n in by_url.items() if n > 1}
    assert not duplicates, f"stored twice: {list(duplicates.items())[:3]}"
    # A record beyond what the client saw can only be a request the kill cut off after it finished.
    assert set(by_url) - set(answered) <= in_flight


CHATTR = shutil.which("chattr")


def _immutable(paths: list[Path], on: bool) -> bool:
    flag = "+i" if on else "-i"
    result = subprocess.run([CHATTR, flag, *map(str, paths)], capture_output=True)
    return result.returncode == 0


@pytest.mark.skipif(CHATTR is None, reason="chattr (e2fsprogs) is needed to make a directory unwritable for root")
def test_unwritable_spool_holds_records_in_memory_then_catches_up(cluster, origins):
    memory_bytes = 40_000
    cluster.start_master(harness.make_policy())
    slave = cluster.slave(keepalive=1, args=["--spool-memory-bytes", str(memory_bytes)]).start()
    spool_dir = slave.state_dir / "spool"
    marker = f"/ro-{uuid.uuid4().hex[:12]}/"
    locked = [spool_dir, *spool_dir.iterdir()]
    # With workers (the default), each writes its own spool: make those unwritable too.
    for slot_dir in sorted((slave.state_dir / "spool-workers").glob("*")):
        locked += [slot_dir, *slot_dir.iterdir()]
    if not _immutable(locked, True):
        pytest.skip("this file system or container does not allow chattr +i (CAP_LINUX_IMMUTABLE)")
    try:
        mark = slave.extended_mark()
        statuses = [status_of(slave, origins.url(f"{marker}{i}")) for i in range(300)]
        assert statuses == [200] * 300, "the node keeps proxying while its spool cannot be written"
        # Workers report their spools to the node about once a second.
        health = harness.wait_until(lambda: (h := slave.health()[1]) and not h["spool"]["writable"]
                                    and h["spool"]["memory_records"] + h["spool"]["dropped_records"] == 300 and h,
                                    10, "the spool's state in /health")
        spool = health["spool"]
        assert spool["writable"] is False and spool["reason"]
        assert 0 < spool["memory_bytes"] <= memory_bytes
        held = spool["memory_records"]
        dropped = spool["dropped_records"]
        assert held + dropped == 300 and dropped > 0, spool
        slave.wait_for_lines(lambda line: "spool cannot be written" in line, since=mark)
        slave.wait_for_lines(lambda line: "further records are dropped and counted" in line, since=mark)
        view = cluster.wait_view(slave.name, lambda e: any("spool not writable" in w for w in e["warnings"]),
                                 10, "the spool problem in the cluster view")
        assert view["dropped_records"] == dropped or view["dropped_records"] >= 0
    finally:
        assert _immutable(locked, False)
    rows = _stored(cluster, marker, held)
    assert len(rows) == held and len({row[3] for row in rows}) == held
    slave.wait_for_lines(lambda line: "spool writable again" in line, since=mark)
    health = harness.wait_until(lambda: (h := slave.health()[1]) and h["spool"]["backlog_records"] == 0 and h,
                                20, "an empty backlog")
    assert health["spool"]["writable"] is True and health["spool"]["dropped_records"] == dropped
    cluster.wait_view(slave.name, lambda e: e["dropped_records"] == dropped and
                      not any("spool not writable" in w for w in e["warnings"]), 10, "drops counted, problem gone")


@pytest.mark.skipif(CHATTR is None, reason="chattr (e2fsprogs) is needed to make a directory unwritable for root")
def test_a_slave_started_with_an_unwritable_spool_serves_and_ships_once_it_can(cluster, origins):
    """A node (and each of its workers) starting while its spool cannot be written serves at once,
    holds the records in memory, and ships every one of them once writing works again."""
    cluster.start_master(harness.make_policy())
    slave = cluster.slave(keepalive=1).start()
    slave.stop()
    locked = [slave.state_dir / "spool", *(slave.state_dir / "spool").iterdir()]
    for slot_dir in sorted((slave.state_dir / "spool-workers").glob("*")):
        locked += [slot_dir, *slot_dir.iterdir()]
    if not _immutable(locked, True):
        pytest.skip("this file system or container does not allow chattr +i (CAP_LINUX_IMMUTABLE)")
    marker = f"/ro-start-{uuid.uuid4().hex[:12]}/"
    try:
        mark = slave.extended_mark()
        slave.start()
        statuses = [status_of(slave, origins.url(f"{marker}{i}")) for i in range(40)]
        assert statuses == [200] * 40
        harness.wait_until(lambda: (h := slave.health()[1]) and not h["spool"]["writable"]
                           and h["spool"]["memory_records"] == 40, 15, "40 records held in memory")
        assert not slave.extended_lines(lambda line: "Traceback" in line or "Unhandled error" in line, since=mark)
        assert cluster.report_rows(marker) == []
    finally:
        assert _immutable(locked, False)
    rows = _stored(cluster, marker, 40)
    assert len(rows) == 40 and len({row[3] for row in rows}) == 40


def test_sigkill_under_load_loses_nothing_on_a_standalone_node(tmp_path, origins):
    import sqlite3

    policy = tmp_path / "policy.json"
    harness.write_json_atomically(policy, harness.make_policy())
    node = ClusterNode(tmp_path, "solo", "standalone", "127.0.0.9", ["--policy", str(policy)])
    node.start()
    marker = f"/solo-{uuid.uuid4().hex[:12]}/"
    loads = [Load(node, lambda i, k=k: origins.url(f"{marker}c{k}/{i}")) for k in range(4)]
    try:
        for load in loads:
            load.start()
        harness.wait_until(lambda: sum(len(x.answered) for x in loads) >= 600, 60, "600 answered requests")
        node.kill()
    finally:
        for load in loads:
            load.halt.set()
        for load in loads:
            load.join(15)
    answered = {url for load in loads for url in load.answered}
    in_flight = {url for load in loads for url in load.failed}
    node.restart()

    def stored():
        conn = sqlite3.connect(f"file:{node.state_dir / 'reports.sqlite3'}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("SELECT url FROM requests WHERE instr(url, ?) > 0", (marker,)).fetchall()
        finally:
            conn.close()
        return rows if len(rows) >= len(answered) else None

    try:
        rows = harness.wait_until(stored, 40, "every answered request in the node's own report store", interval=0.25)
        by_url = Counter(url for (url,) in rows)
        assert not answered - set(by_url)
        assert max(by_url.values()) == 1
        assert set(by_url) - answered <= in_flight
    finally:
        node.stop()
