"""policy/release.py: a replaced version is taken apart a piece at a time, but never a part that
anything else still holds."""

from __future__ import annotations

import tempfile

from twisted.internet import defer

from safesquid_tw.policy.applier import PolicyApplier
from safesquid_tw.policy.codec import load_policy_bytes
from safesquid_tw.policy.model import RequestFacts
from safesquid_tw.policy.release import release_in_pieces
from safesquid_tw.policy.store import PolicyStore


def document(domains: int = 2000) -> bytes:
    names = ", ".join(f'"site{i}.test"' for i in range(domains))
    return (b'{"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": '
            b'[{"name": "cat", "action": "deny", "categories": ["big"]}]}, '
            b'"categories": {"big": {"domains": [' + names.encode() + b']}}}')


def no_wait(_seconds: float) -> None:
    raise AssertionError("should not have waited")


def test_a_version_nothing_else_holds_is_taken_apart():
    policy = load_policy_bytes(document(), 1)
    domains = policy.document["categories"]["big"]["domains"]
    assert len(domains) == 2000
    box = [policy]
    del domains, policy
    assert release_in_pieces(box, sleep=no_wait) > 5 and box == []


def test_parts_held_elsewhere_stay_whole():
    policy = load_policy_bytes(document(), 1)
    shared_list = policy.document["categories"]["big"]["domains"]  # e.g. copied into a newer version
    compiled = policy.compiled  # e.g. a request still running under the old version
    box = [policy]
    del policy
    release_in_pieces(box, sleep=no_wait)
    assert len(shared_list) == 2000
    facts = RequestFacts(client_ip="192.0.2.1", method="GET", scheme="http", host="site7.test", port=80, path="/", user=None)
    assert compiled.decide(facts).action == "deny"


def test_a_version_still_held_is_waited_for_then_left_whole():
    policy = load_policy_bytes(document(), 1)
    holder = policy
    now = [0.0]
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    assert release_in_pieces([policy], sleep=nap, clock=lambda: now[0]) == 0
    assert naps and len(holder.document["categories"]["big"]["domains"]) == 2000


def test_a_store_swap_retires_the_old_version_and_the_new_one_keeps_working():
    jobs = []

    def runner(fn, *args):
        jobs.append((fn, args))
        if fn is release_in_pieces:
            return defer.succeed(None)
        return defer.maybeDeferred(fn, *args)

    store = PolicyStore(tempfile.mkdtemp())
    store.applier = PolicyApplier(runner)
    store.install_blob_async(document(), 1)
    store.install_blob_async(document(3000), 2)
    [(fn, (box,))] = [job for job in jobs if job[0] is release_in_pieces]
    assert box[0].version == 1 and store.current.version == 2
    assert release_in_pieces(box, sleep=no_wait) > 5
    facts = RequestFacts(client_ip="192.0.2.1", method="GET", scheme="http", host="site2999.test", port=80, path="/", user=None)
    assert store.current.compiled.decide(facts).action == "deny"
