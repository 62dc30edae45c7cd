"""The node's shared connection counts: a client's limit holds across workers, a restarted
worker's slot starts from zero, the node total is every slot's sum."""

from __future__ import annotations

from safesquid_tw.workers import limits
from safesquid_tw.workers.limits import NodeCounts, create_table


def two_workers(tmp_path):
    path = tmp_path / "connections.table"
    create_table(path, 2)
    return NodeCounts(path, 2, 0), NodeCounts(path, 2, 1)


def test_a_clients_limit_counts_its_connections_on_every_worker(tmp_path):
    a, b = two_workers(tmp_path)
    assert a.open("10.0.0.1", 3) is None
    assert b.open("10.0.0.1", 3) is None
    assert a.open("10.0.0.1", 3) is None
    assert b.open("10.0.0.1", 3) == 3  # the fourth, whichever worker took it
    assert a.open("10.0.0.2", 3) is None  # another client is not affected
    assert a.total() == b.total() == 4
    b.close("10.0.0.1")
    assert a.open("10.0.0.1", 3) is None
    assert a.count("10.0.0.1") == 3


def test_a_restarted_workers_slot_starts_from_zero(tmp_path):
    a, b = two_workers(tmp_path)
    for _ in range(2):
        assert b.open("10.0.0.1", 2) is None
    assert a.open("10.0.0.1", 2) == 2
    NodeCounts(tmp_path / "connections.table", 2, 1)  # b's successor: b's connections died with it
    assert a.open("10.0.0.1", 2) is None
    assert a.total() == 1


def test_a_full_bucket_counts_per_worker_instead_of_refusing(tmp_path, monkeypatch):
    a, b = two_workers(tmp_path)
    monkeypatch.setattr(limits, "_bucket", lambda key: 0)  # every client in one bucket
    for n in range(limits.WAYS):
        assert a.open(f"10.0.1.{n}", 1) is None
    assert a.open("10.0.2.1", 1) is None  # no room: counted by this worker alone
    assert a.open("10.0.2.1", 1) == 1
    a.close("10.0.2.1")
    a.close("10.0.1.0")  # a way frees up
    assert b.open("10.0.2.2", 1) is None
    assert a.total() == limits.WAYS  # 7 on a, 1 on b
