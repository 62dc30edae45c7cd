"""A slave that runs the version before takes a new one as the sections that changed (nothing of
the whole document crosses the wire); any other slave, or a change that does not make the announced
digest, gets the whole version in chunks as before. The slave's cache holds the whole document."""

from __future__ import annotations

import json

import pytest

from safesquid_tw.cluster import wire
from safesquid_tw.policy import sectionchange
from safesquid_tw.policy.codec import canonical_bytes
from safesquid_tw.policy.sectionchange import ChangeNotApplicable, rebuild_from_change, section_change

from tests.unit.cluster.test_control_plane import Master, Slave, clock, flush_all, policy  # noqa: F401 (fixture)


@pytest.fixture
def master(tmp_path, clock) -> Master:
    return Master(tmp_path / "master", clock)


def big(comment: str, extra: str = "x.invalid") -> dict:
    domains = [f"host-{i:06d}.bulk.invalid" for i in range(20000)]
    return policy("first.invalid", extra, comment=comment,
                  categories={"bulk": {"description": "many hosts", "domains": domains}})


def push(master: Master, document: dict) -> int:
    """As the API does: prepared in the store's applier (synchronous in unit tests)."""
    got: list = []
    master.store.apply_document_async(document, source="api").addBoth(got.append)
    return got[0].version


def whole_fetches(slave: Slave, monkeypatch) -> list[int]:
    fetched: list[int] = []
    original = slave.store.prepare_blob

    def counted(blob, version, **kwargs):
        fetched.append(version)
        return original(blob, version, **kwargs)

    monkeypatch.setattr(slave.store, "prepare_blob", counted)
    return fetched


def test_a_comment_change_reaches_the_slave_as_the_changed_section_only(master, clock, tmp_path, monkeypatch):
    push(master, big("one"))
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    fetched = whole_fetches(slave, monkeypatch)
    version = push(master, big("two"))
    change = master.plane.publication.change
    assert change is not None and len(change.data) < 1000 and json.loads(change.data)["changed"] == {"comment": "two"}
    flush_all(link)
    assert slave.version == version and fetched == []
    assert slave.store.current.digest == master.store.current.digest
    assert slave.store.current.document == master.store.current.document
    assert slave.store.current.compiled._categories is not None
    cached = json.loads(slave.store.cache_path.read_bytes())
    assert cached["digest"] == master.store.current.digest and canonical_bytes(cached["policy"]) == \
        canonical_bytes(master.store.current.document)
    assert master.record("slave1").policy_version == version
    # A rule changes too: still only the changed sections.
    version = push(master, big("three", extra="y.invalid"))
    flush_all(link)
    assert slave.version == version and fetched == []
    assert slave.store.current.compiled.decide  # compiled, and the same decisions as the master's
    assert slave.store.current.compiled.rule_names == master.store.current.compiled.rule_names


def test_a_slave_that_missed_a_version_gets_the_whole_one(master, clock, tmp_path, monkeypatch):
    push(master, big("one"))
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    fetched = whole_fetches(slave, monkeypatch)
    link.close()
    push(master, big("two"))
    version = push(master, big("three"))
    slave.connect(master)
    assert slave.version == version and fetched == [version]
    assert slave.store.current.digest == master.store.current.digest


def test_a_change_that_does_not_make_the_announced_digest_falls_back_to_the_whole_version(
        master, clock, tmp_path, monkeypatch):
    push(master, big("one"))
    slave = Slave(tmp_path, clock, "slave1")
    link = slave.connect(master)
    fetched = whole_fetches(slave, monkeypatch)
    real = sectionchange.rebuild_from_change

    def tampered(data, current):
        document = real(data, current)
        return dict(document, comment="not what the master has")

    monkeypatch.setattr("safesquid_tw.policy.store.rebuild_from_change", tampered)
    version = push(master, big("two"))
    flush_all(link)
    assert slave.version == version and fetched == [version]
    assert slave.store.current.document["comment"] == "two"


def test_a_change_too_big_for_one_call_is_not_offered(master, clock, tmp_path):
    push(master, big("one"))
    push(master, big("two") | {"categories": {"bulk": {"domains": [f"h{i}.other.invalid" for i in range(20000)]}}})
    assert master.plane.publication.change is None  # slaves fetch the whole version in chunks


def test_rebuild_refuses_a_change_against_another_version(master):
    first = master.store.current
    push(master, policy("a.invalid", comment="x"))
    second = master.store.current
    change = section_change(first, second, {})
    assert rebuild_from_change(change.data, first) == second.document
    with pytest.raises(ChangeNotApplicable):
        rebuild_from_change(change.data, second)
    with pytest.raises(ChangeNotApplicable):
        rebuild_from_change(b"[1]", first)
    assert section_change(first, second, {}, limit=10) is None


def test_the_wire_contract_bounds_the_change():
    wire.check_args("avatar", "policy_change", (2, b"\0" * 32), {})
    with pytest.raises(wire.WireError):
        wire.check_args("avatar", "policy_change", (2, b"\0" * 31), {})
    wire.check_result("avatar", "policy_change", b"")
    with pytest.raises(wire.WireError):
        wire.check_result("avatar", "policy_change", b"x" * (wire.MAX_CHUNK_BYTES + 1))
