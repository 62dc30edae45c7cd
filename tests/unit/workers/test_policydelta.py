"""Workers get a version as the sections that changed since the one they run: they rebuild the same
document, reuse what they compiled for the rest, and ask for the whole version when their base is
not the one the change was made against."""

from __future__ import annotations

import copy

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from safesquid_tw.config import NodeConfig
from safesquid_tw.policy.codec import digest
from safesquid_tw.policy.compiled import Policy, compile_policy
from safesquid_tw.policy.incremental import apply_sections
from safesquid_tw.policy.model import RequestFacts
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.workers.child import Worker
from safesquid_tw.workers.policydelta import (
    NeedWholeVersion, change_message, compile_message, merge_waiting, whole_message)
from safesquid_tw.workers.frames import FrameReader, encode

from tests.unit.workers.test_worker_pool import _pool, _say, _worker


def document(comment: str = "", games: tuple[str, ...] = ("play.test",), rule_domain: str = "blocked.test") -> dict:
    return validate_document({
        "format": "safesquid-policy/1", "comment": comment,
        "categories": {"games": {"domains": list(games)}},
        "access": {"default_action": "allow", "rules": [
            {"name": "no-games", "action": "deny", "categories": ["games"]},
            {"name": "blocked", "action": "deny", "domains": [rule_domain]}]}})


def policy(number: int, doc: dict, previous: Policy | None = None) -> Policy:
    return Policy(version=number, digest=digest(doc), document=doc,
                  compiled=compile_policy(doc, previous.compiled if previous else None))


def decisions(compiled) -> list:
    hosts = ("play.test", "arcade.test", "blocked.test", "other.test")
    return [compiled.decide(RequestFacts(client_ip="127.0.0.1", method="GET", scheme="http", host=h, port=80,
                                         path="/")).rule for h in hosts]


def through_the_pipe(message: dict) -> dict:
    got: list = []
    FrameReader(got.append).feed(encode(message))
    return got[0]


def test_a_change_rebuilds_the_same_version_and_reuses_the_unchanged_pieces():
    v1 = policy(1, document())
    v2 = policy(2, document(comment="two"))
    message = through_the_pipe(change_message(v1, v2))
    assert message["changed"] == {"comment": "two"} and message["removed"] == []
    got = compile_message(message, v1)
    assert got.document == v2.document and got.digest == v2.digest and got.version == 2
    assert got.compiled._categories is v1.compiled._categories and got.compiled._rules is v1.compiled._rules
    # A referenced list changes: the category index is rebuilt, decisions are a full compile's.
    v3 = policy(3, document(comment="two", games=("play.test", "arcade.test")))
    got3 = compile_message(through_the_pipe(change_message(v2, v3)), got)
    assert got3.document == v3.document
    assert got3.compiled._categories is not got.compiled._categories
    assert decisions(got3.compiled) == decisions(compile_policy(v3.document))
    assert decisions(got3.compiled) == ["no-games", "no-games", "blocked", None]


def test_a_change_against_another_version_needs_the_whole_one():
    v1, v2 = policy(1, document()), policy(2, document(comment="two"))
    v3 = policy(3, document(comment="three"))
    with pytest.raises(NeedWholeVersion):
        compile_message(change_message(v2, v3), v1)
    with pytest.raises(NeedWholeVersion):
        compile_message(change_message(v2, v3), None)
    assert compile_message(through_the_pipe(whole_message(v3)), v1).document == v3.document


def test_changes_waiting_behind_each_other_fold_into_one():
    v1, v2 = policy(1, document()), policy(2, document(comment="two"))
    v3 = policy(3, document(comment="two", rule_domain="other.test"))
    folded = merge_waiting(change_message(v1, v2), change_message(v2, v3))
    assert folded["version"] == 3 and folded["base"] == v1.digest
    assert compile_message(folded, v1).document == v3.document
    whole_then_change = merge_waiting(whole_message(v2), change_message(v2, v3))
    assert "doc" in whole_then_change and compile_message(whole_then_change, None).document == v3.document
    # A change against something else than what waits replaces it (and will ask for the whole).
    assert merge_waiting(whole_message(v1), change_message(v2, v3))["base"] == v2.digest
    # A section removed by the second change is gone from the folded one.
    v4_doc = dict(v3.document)
    v4_doc.pop("dlp")
    v4 = Policy(version=4, digest=digest(v4_doc), document=v4_doc, compiled=v3.compiled)  # not compiled here
    folded = merge_waiting(change_message(v2, v3), change_message(v3, v4))
    assert "dlp" in folded["removed"] and "dlp" not in folded["changed"]
    assert apply_sections(v2.document, folded["changed"], folded["removed"]) == v4_doc


class HeldRunner:
    def __init__(self) -> None:
        self.jobs: list = []

    def __call__(self, fn, *args, **kwargs) -> defer.Deferred:
        d = defer.Deferred()
        self.jobs.append((d, fn, args, kwargs))
        return d

    def run_all(self) -> None:
        while self.jobs:
            d, fn, args, kwargs = self.jobs.pop(0)
            try:
                d.callback(fn(*args, **kwargs))
            except Exception as e:  # the failure goes to the Deferred, as deferToThread does
                d.errback(e)


def test_a_worker_asks_for_the_whole_version_when_its_base_differs():
    runner = HeldRunner()
    worker = Worker(MemoryReactorClock(), NodeConfig(node_name="n1"), [], in_thread=runner)
    sent: list = []
    worker.pipe.send = sent.append
    v1, v2, v3 = policy(1, document()), policy(2, document(comment="2")), policy(3, document(comment="3"))
    worker.received(through_the_pipe(whole_message(v1)))
    runner.run_all()
    worker.received(through_the_pipe(change_message(v2, v3)))  # it never got version 2
    runner.run_all()
    assert worker.policy.current.version == 1
    assert sent[-1] == {"t": "policy", "version": 1, "error": None, "resend": True}
    worker.received(through_the_pipe(whole_message(v3)))
    runner.run_all()
    assert worker.policy.current.version == 3 and sent[-1] == {"t": "policy", "version": 3, "error": None}
    assert worker.policy.current.compiled._categories is not None


def test_the_pool_sends_changes_to_workers_on_the_version_before_and_the_whole_one_otherwise(tmp_path):
    reactor = MemoryReactorClock()
    pool, store, _records, _state, _spawned = _pool(tmp_path, reactor)
    first = {"format": "safesquid-policy/1", "categories": {"games": {"domains": ["play.test"]}},
             "access": {"default_action": "allow", "rules": []}}
    store.apply_document(first, source="test")
    workers = [_worker(pool, slot, 100 + slot) for slot in range(2)]
    for w in workers:
        _say(w, {"t": "hello", "pid": w.pid})
    assert all("doc" in w.transport.messages()[0] for w in workers)
    second = copy.deepcopy(first)
    second["comment"] = "second"
    store.apply_document(second, source="test")
    for w in workers:
        last = w.transport.messages()[-1]
        assert last["changed"] == {"comment": "second"} and last["version"] == 2
        assert "doc" not in last
    # Worker 0 could not apply it: it gets the whole version in force.
    _say(workers[0], {"t": "policy", "version": 1, "error": None, "resend": True})
    last = workers[0].transport.messages()[-1]
    assert last["version"] == 2 and last["doc"] == store.current.document
    # A worker started since (nothing sent to it yet) gets the whole version.
    late = _worker(pool, 1, 202)
    _say(late, {"t": "hello", "pid": 202})
    assert "doc" in [m for m in late.transport.messages() if m["t"] == "policy"][0]


def test_a_whole_version_in_a_large_frame_is_decoded_in_the_compiling_thread():
    runner = HeldRunner()
    worker = Worker(MemoryReactorClock(), NodeConfig(node_name="n1"), [], in_thread=runner)
    sent: list = []
    worker.pipe.send = sent.append
    v1 = policy(1, document(games=tuple(f"site{i}.games.test" for i in range(20000))))
    frame = encode(whole_message(v1))
    assert len(frame) > worker.pipe.reader.large_at
    worker.pipe.dataReceived(frame)
    # Nothing decoded on the reactor: the undecoded frame waits for the thread.
    assert worker._pending is None and isinstance(runner.jobs[0][2][0]["frame"], bytes)
    runner.run_all()
    assert worker.policy.current.document == v1.document and sent[-1]["version"] == 1
    assert decisions(worker.policy.current.compiled)[0] is None
    small: list = []
    reader = FrameReader(small.append, deliver_large=lambda body: pytest.fail("a small frame"))
    reader.feed(encode(change_message(v1, policy(2, dict(v1.document, comment="2")))))
    assert small[0]["changed"] == {"comment": "2"}


def test_a_large_frame_that_is_not_json_is_refused_and_the_running_version_stays():
    runner = HeldRunner()
    worker = Worker(MemoryReactorClock(), NodeConfig(node_name="n1"), [], in_thread=runner)
    sent: list = []
    worker.pipe.send = sent.append
    worker.received(whole_message(policy(1, document())))
    runner.run_all()
    worker.received_large(b"{" + b" " * 10)
    runner.run_all()
    assert worker.policy.current.version == 1
    assert sent[-1]["version"] == 1 and "not JSON" in sent[-1]["error"]
