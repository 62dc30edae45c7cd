"""PolicyStore: versions, the on-disk cache, corrupt caches, slaves installing a master's version."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from safesquid_tw.policy.codec import PolicyError, load_policy_bytes, policy_from_document
from safesquid_tw.policy.compiled import Policy
from safesquid_tw.policy.model import Identity
from safesquid_tw.policy.store import PolicyCacheCorrupt, PolicyStore

HASH = "$argon2id$v=19$m=8,t=1,p=1$cJu0yK/+nzC1VtADOSxZHg$zwU5BT7rNZl7tWAPXzBgIdpA+MlVhFqoaKeWqBAiDQc"  # "bench"
FIXED_TIME = 1715769000.0  # 2024-05-15T10:30:00Z


def doc(default: str = "deny", rule_domain: str = "a.test") -> dict[str, Any]:
    return {
        "format": "safesquid-policy/1",
        "access": {"default_action": default, "rules": [{"name": "r", "action": "deny", "domains": [rule_domain]}]},
        "users": [{"name": "u", "password_hash": HASH}],
    }


@pytest.fixture
def store(tmp_path: Path) -> PolicyStore:
    return PolicyStore(tmp_path, clock=lambda: FIXED_TIME)


def test_empty_store(store: PolicyStore) -> None:
    assert store.current is None
    assert store.load_cache() is None
    assert store.current is None


def test_versions_increase_and_observers_hear_each_swap(store: PolicyStore) -> None:
    seen: list[Policy] = []
    store.add_observer(seen.append)
    first = store.apply_document(doc(), source="test")
    second = store.apply_document(doc(default="allow"), source="portal")
    assert (first.version, second.version) == (1, 2)
    assert store.current is second
    assert store.current_source == "portal"
    assert seen == [first, second]


def test_same_digest_makes_no_new_version(store: PolicyStore) -> None:
    seen: list[Policy] = []
    first = store.apply_document(doc(), source="test")
    store.add_observer(seen.append)
    before = store.cache_path.read_bytes()
    reordered = json.loads(json.dumps(doc(), sort_keys=True))
    again = store.apply_document(reordered, source="test")
    assert again is first
    assert seen == []
    assert store.cache_path.read_bytes() == before


def test_bad_document_changes_nothing(store: PolicyStore) -> None:
    seen: list[Policy] = []
    first = store.apply_document(doc(), source="test")
    store.add_observer(seen.append)
    before = store.cache_path.read_bytes()
    with pytest.raises(PolicyError) as raised:
        store.apply_document(doc(rule_domain="*."), source="test")
    assert raised.value.path == "access.rules[0] (r).domains[0]"
    assert store.current is first
    assert store.cache_path.read_bytes() == before
    assert seen == []


def test_cache_round_trip(tmp_path: Path, store: PolicyStore) -> None:
    store.apply_document(doc(), source="test")
    written = store.apply_document(doc(default="allow"), source="portal")
    mode = stat.S_IMODE(os.stat(store.cache_path).st_mode)
    assert mode == 0o600
    record = json.loads(store.cache_path.read_bytes())
    assert (record["version"], record["digest"], record["source"]) == (2, written.digest, "portal")

    restarted = PolicyStore(tmp_path)
    seen: list[Policy] = []
    restarted.add_observer(seen.append)
    loaded = restarted.load_cache()
    assert loaded is not None and restarted.current is loaded
    assert (loaded.version, loaded.digest, loaded.document) == (2, written.digest, written.document)
    assert restarted.current_source == "portal"
    assert seen == [loaded]
    # Numbering goes on from the cached version.
    assert restarted.apply_document(doc(default="deny"), source="test").version == 3


@pytest.mark.parametrize("damage", [
    lambda data: b"",
    lambda data: data[: len(data) // 2],
    lambda data: b"\x00\xff garbage",
    lambda data: b"[]",
    lambda data: data.replace(b'"default_action":"allow"', b'"default_action":"deny"'),  # digest mismatch
    lambda data: data.replace(b'"default_action":"allow"', b'"default_action":"maybe"'),  # invalid policy
    lambda data: data.replace(b'"version":1', b'"version":0'),
])
def test_corrupt_cache_is_set_aside_and_reported(tmp_path: Path, store: PolicyStore, damage: Any) -> None:
    store.apply_document(doc(default="allow"), source="test")
    damaged = damage(store.cache_path.read_bytes())
    store.cache_path.write_bytes(damaged)

    restarted = PolicyStore(tmp_path, clock=lambda: FIXED_TIME)
    with pytest.raises(PolicyCacheCorrupt) as raised:
        restarted.load_cache()
    aside = tmp_path / "policy" / "current.json.corrupt-20240515T103000Z"
    assert raised.value.moved_to == str(aside)
    assert aside.read_bytes() == damaged
    assert not restarted.cache_path.exists()
    assert restarted.current is None
    assert raised.value.reason
    # Nothing left to load: the next start begins without a cache.
    assert restarted.load_cache() is None


def test_second_corruption_in_the_same_second_keeps_both(tmp_path: Path, store: PolicyStore) -> None:
    for _ in range(2):
        store.cache_path.parent.mkdir(parents=True, exist_ok=True)
        store.cache_path.write_bytes(b"not json")
        with pytest.raises(PolicyCacheCorrupt):
            store.load_cache()
    names = sorted(p.name for p in (tmp_path / "policy").iterdir())
    assert names == ["current.json.corrupt-20240515T103000Z", "current.json.corrupt-20240515T103000Z-2"]


def test_slave_installs_the_masters_version_as_is(store: PolicyStore) -> None:
    seen: list[Policy] = []
    store.add_observer(seen.append)
    master_copy = policy_from_document(doc(), 7)
    store.install(master_copy)
    assert store.current is master_copy and store.current.version == 7
    assert json.loads(store.cache_path.read_bytes())["version"] == 7
    store.install(policy_from_document(doc(), 7))  # same version and digest: nothing to do
    assert seen == [master_copy]
    # A restarted master may number from scratch; the slave follows it.
    older = policy_from_document(doc(default="allow"), 1)
    store.install(older)
    assert store.current is older


def test_install_refuses_a_digest_that_does_not_match(store: PolicyStore) -> None:
    good = policy_from_document(doc(), 3)
    forged = Policy(version=3, digest="sha256:" + "0" * 64, document=good.document, compiled=good.compiled)
    with pytest.raises(PolicyError):
        store.install(forged)
    assert store.current is None
    assert not store.cache_path.exists()


def test_broken_observer_does_not_stop_the_others(store: PolicyStore) -> None:
    seen: list[int] = []

    def broken(policy: Policy) -> None:
        raise RuntimeError("observer bug")

    store.add_observer(broken)
    store.add_observer(lambda policy: seen.append(policy.version))
    store.apply_document(doc(), source="test")
    assert seen == [1]
    assert store.current is not None


def test_verified_credentials_survive_a_policy_update(store: PolicyStore) -> None:
    first = store.apply_document(doc(), source="test")
    assert first.compiled.verify_credentials("u", "bench") == Identity("u", frozenset())
    second = store.apply_document(doc(default="allow"), source="test")
    assert second.compiled.cached_identity("u", "bench") == Identity("u", frozenset())


def test_requests_in_flight_keep_their_version(store: PolicyStore) -> None:
    from safesquid_tw.policy.model import RequestFacts

    facts = RequestFacts(client_ip="192.0.2.1", method="GET", scheme="http", host="b.test", port=80, path="/")
    old = store.apply_document(doc(default="deny"), source="test")
    store.apply_document(doc(default="allow"), source="test")
    assert old.compiled.decide(facts).action == "deny"
    assert store.current is not None and store.current.compiled.decide(facts).action == "allow"


def test_loaded_bytes_and_cache_agree(store: PolicyStore) -> None:
    policy = store.apply_document(doc(), source="test")
    record = json.loads(store.cache_path.read_bytes())
    assert load_policy_bytes(json.dumps(record["policy"]).encode(), 1).digest == policy.digest
