"""A master whose report store is PostgreSQL: two slaves ship under load while the database is
stopped and started again; every request arrives exactly once, the report pages say the store
is unavailable meanwhile, and the slaves' backlogs show the back-pressure."""

from __future__ import annotations

import uuid
from collections import Counter

import psycopg
import pytest

import harness
from cluster_harness import cluster  # noqa: F401 - fixture
from test_cluster_reports import Traffic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def stored_rows(url: str, fragment: str) -> list[tuple[str, int, int, str]]:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            return conn.execute(
                "SELECT node, segment, seq, url FROM access_records WHERE strpos(url, %s) > 0", (fragment,)
            ).fetchall()
    except psycopg.errors.UndefinedTable:
        return []


def test_database_stopped_and_restarted_under_load_loses_and_doubles_nothing(cluster, origins, postgres_server):
    database = postgres_server.new_database("cluster")
    cluster.start_master(harness.make_policy(), args=["--report-store", database])
    slaves = cluster.add_slaves(2, keepalive=1)
    run = uuid.uuid4().hex[:12]
    marker = f"/pg-{run}/"

    traffic = Traffic(slaves, lambda i: origins.url(f"{marker}{i}"), limit=40000, duration=90)
    traffic.start()
    try:
        traffic.wait_for(150)
        harness.wait_until(lambda: len(stored_rows(database, marker)) > 0, 15, "records in PostgreSQL")
        postgres_server.stop()
        stopped_at = len(traffic.answered)
        traffic.wait_for(stopped_at + 200)
        status, body = cluster.api("GET", "/api/v1/reports/requests?period=hour")
        assert status == 503, (status, body)
        backlog = harness.wait_until(
            lambda: sum(cluster.node_view(s.name)["backlog_records"] for s in slaves) or None, 15,
            "a backlog on the slaves while the database is down")
        postgres_server.start()
        restarted_at = len(traffic.answered)
        traffic.wait_for(restarted_at + 150)
    finally:
        traffic.halt.set()
        traffic.join(15)
        if not postgres_server.running():
            postgres_server.start()
    assert not traffic.failed, f"{len(traffic.failed)} requests got no answer: {traffic.failed[:5]}"
    sent = Counter(traffic.answered)
    assert len(sent) == len(traffic.answered)
    print(f"\n{len(sent)} requests; database stopped after {stopped_at} (backlog {backlog}), back after {restarted_at}")

    rows = harness.wait_until(
        lambda: (lambda r: r if len(r) >= len(sent) else None)(stored_rows(database, marker)), 45,
        f"{len(sent)} requests in PostgreSQL", interval=0.5)
    by_url = Counter(row[3] for row in rows)
    duplicates = {url: n for url, n in by_url.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} requests stored more than once, e.g. {list(duplicates.items())[:3]}"
    assert set(by_url) == set(sent)
    assert {row[0] for row in rows} == {s.name for s in slaves}
    status, found = cluster.api("GET", f"/api/v1/reports/requests?period=hour&domain={origins.host}&page_size=1")
    assert status == 200 and found["total"] == len(sent), (status, found.get("total"))
    for slave in slaves:
        cluster.wait_view(slave.name, lambda e: e["backlog_records"] == 0 and e["dropped_records"] == 0, 15,
                          "an empty spool and nothing dropped")
