"""policy/store.py: a slave's version arriving as chunks is reassembled, checked and decoded in
the worker, and whatever is wrong with it is refused with the reason while the running version
stays; shadowed-rule warnings are computed while preparing, not at the swap."""

from __future__ import annotations

import hashlib

import pytest
from twisted.internet import defer

from safesquid_tw.cluster import wire
from safesquid_tw.policy import shadowing
from safesquid_tw.policy.codec import canonical_bytes
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.store import PolicyStore


def doc(name: str, *, shadowed: bool = False) -> dict:
    rules = [{"name": name, "action": "deny", "domains": [f"{name}.test"]}]
    if shadowed:
        rules.append({"name": f"{name}-again", "action": "deny", "domains": [f"www.{name}.test"]})
        rules[0]["domains"] = [f"*.{name}.test"]
    return {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": rules}}


def outcome(d: defer.Deferred) -> object:
    out: list = []
    d.addBoth(out.append)
    assert out, "the synchronous runner fires at once"
    return out[0]


def assembled(blob: bytes, chunk_size: int = wire.MIN_CHUNK_BYTES) -> wire.BlobAssembler:
    manifest, chunks = wire.split_blob(blob, chunk_size)
    assembler = wire.BlobAssembler(manifest)
    for index, chunk in enumerate(chunks):
        assembler.add(index, chunk)
    return assembler


@pytest.fixture
def store(tmp_path) -> PolicyStore:
    store = PolicyStore(tmp_path)
    assert outcome(store.install_blob_async(canonical_bytes(doc("running")), 3)).version == 3
    return store


def test_chunks_are_joined_and_checked_in_the_job(store):
    blob = canonical_bytes(doc("next")) + b" " * 3000  # several chunks; blanks are valid JSON
    policy = outcome(store.install_blob_async(assembled(blob).result, 4))
    assert policy.version == 4 and store.current is policy
    assert store.current.document["access"]["rules"][0]["name"] == "next"


def test_a_blob_whose_digest_differs_is_refused_and_the_running_version_stays(store):
    blob = canonical_bytes(doc("next"))
    manifest, chunks = wire.split_blob(blob)
    forged = wire.BlobManifest(size=manifest.size, sha256=hashlib.sha256(b"other").digest(),
                               chunk_size=manifest.chunk_size, chunks=manifest.chunks)
    assembler = wire.BlobAssembler(forged)
    for index, chunk in enumerate(chunks):
        assembler.add(index, chunk)
    failure = outcome(store.install_blob_async(assembler.result, 4))
    assert failure.check(wire.WireError) and "digest" in str(failure.value)
    assert store.current.version == 3 and store.applier.jobs_failed == 1
    assert b'"running"' in store.cache_path.read_bytes()


@pytest.mark.parametrize("blob, reason", [
    (b"\xff\xfe not text", "is not UTF-8"),
    (b'{"format": "safesquid-policy/1", "access": ', "line 1 column"),
    (b'{"format": "safesquid-policy/1", "format": "x"}', "appears twice"),
    (b'{"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": '
     b'[{"name": "r", "action": "deny", "domains": ["bad..name"]}]}}', "bad label"),
])
def test_a_bad_blob_is_refused_with_the_reason_and_the_running_version_stays(store, blob, reason):
    failure = outcome(store.install_blob_async(assembled(blob).result, 4))
    assert failure.check(PolicyError) and reason in str(failure.value)
    assert store.current.version == 3 and store.current.document["access"]["rules"][0]["name"] == "running"
    assert b'"running"' in store.cache_path.read_bytes()


def test_warnings_are_computed_while_preparing_and_kept_with_the_version(store):
    prepared = store.prepare_document(doc("site", shadowed=True), source="test")
    assert prepared.policy in shadowing._by_policy  # computed in the job, before the swap
    policy = store.commit_prepared(prepared)
    [warning] = shadowing.policy_warnings(policy)
    assert warning.rule == "site-again" and shadowing.policy_warnings(policy) is shadowing.policy_warnings(policy)


def test_a_store_that_does_not_warn_leaves_them_uncomputed(store):
    store.shadow_warnings = False
    prepared = store.prepare_blob(canonical_bytes(doc("site", shadowed=True)), 4)
    assert prepared.policy not in shadowing._by_policy
