"""PolicyApplier and the store's off-reactor paths: one job at a time, the newest pending one
wins, refusals keep the running version, the swap happens on the caller's thread."""

from __future__ import annotations

import threading

from twisted.internet import defer

from safesquid_tw.policy.history import PolicyHistory
from safesquid_tw.policy.applier import PolicyApplier, PolicySuperseded, synchronous_runner
from safesquid_tw.policy.codec import canonical_bytes
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.store import PolicyStore
from .test_store import doc as sample_doc


class ManualRunner:
    """Holds each job until the test says so: the 'worker thread' is the test itself."""

    def __init__(self) -> None:
        self.jobs: list[tuple[object, defer.Deferred]] = []

    def __call__(self, fn, *args, **kwargs) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((lambda: fn(*args, **kwargs), d))
        return d

    def run_next(self) -> None:
        fn, d = self.jobs.pop(0)
        try:
            result = fn()
        except Exception:
            d.errback()
        else:
            d.callback(result)


def _results(d: defer.Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_jobs_run_one_at_a_time_and_the_newest_pending_one_wins():
    runner = ManualRunner()
    applier = PolicyApplier(runner)
    committed: list[str] = []
    first = _results(applier.submit(lambda: "a", committed.append))
    second = _results(applier.submit(lambda: "b", committed.append))
    third = _results(applier.submit(lambda: "c", committed.append))
    assert len(runner.jobs) == 1 and applier.busy and applier.pending  # one runs, one waits
    assert second and second[0].check(PolicySuperseded)  # replaced before it started
    runner.run_next()
    assert committed == ["a"] and first == [None]
    assert len(runner.jobs) == 1  # the waiting job starts after the first one's swap
    runner.run_next()
    assert committed == ["a", "c"] and third == [None]
    assert applier.stats()["jobs_superseded"] == 1 and applier.jobs_done == 2 and not applier.busy


def test_a_failing_job_does_not_block_the_next_one():
    runner = ManualRunner()
    applier = PolicyApplier(runner)

    def bad():
        raise PolicyError("access", "broken")

    failed = _results(applier.submit(bad, lambda r: r))
    ok = _results(applier.submit(lambda: 1, lambda r: r + 1))
    runner.run_next()
    assert failed[0].check(PolicyError)
    runner.run_next()
    assert ok == [2] and applier.jobs_failed == 1


def _doc(marker: str) -> dict:
    return sample_doc(rule_domain=f"{marker}.test") | {"access": {
        "default_action": "deny", "rules": [{"name": marker, "action": "deny", "domains": [f"{marker}.test"]}]}}


def test_the_work_runs_on_the_runner_and_the_swap_on_the_callers_thread(tmp_path):
    store = PolicyStore(tmp_path)
    seen: dict[str, object] = {}

    def threaded(fn, *a, **kw):
        d: defer.Deferred = defer.Deferred()
        out: dict = {}

        def body():
            seen["work"] = threading.current_thread()
            out["r"] = fn(*a, **kw)

        t = threading.Thread(target=body)
        t.start()
        t.join()
        d.callback(out["r"])
        return d

    store.applier = PolicyApplier(threaded)
    store.add_observer(lambda p: seen.setdefault("swap", threading.current_thread()))
    result = _results(store.apply_document_async(_doc("one"), source="test"))
    assert result[0].version == 1 and store.current is result[0]
    assert seen["work"] is not threading.current_thread() and seen["swap"] is threading.current_thread()
    assert store.current_bytes == canonical_bytes(store.current.document)
    assert store.cache_path.exists()


def test_a_refused_document_keeps_the_running_version_and_says_why(tmp_path):
    store = PolicyStore(tmp_path)
    store.applier = PolicyApplier(synchronous_runner)
    _results(store.apply_document_async(_doc("one"), source="test"))
    cache_before = store.cache_path.read_bytes()
    bad = _doc("two")
    bad["access"]["default_action"] = "explode"
    result = _results(store.apply_document_async(bad, source="test"))
    assert result[0].check(PolicyError) and "default_action" in str(result[0].value)
    assert store.current.version == 1 and store.cache_path.read_bytes() == cache_before


def test_history_apply_async_writes_the_version_file_and_a_superseded_apply_changes_nothing(tmp_path):
    store = PolicyStore(tmp_path)
    runner = ManualRunner()
    store.applier = PolicyApplier(runner)
    history = PolicyHistory(store, tmp_path)
    first = _results(history.apply_async(_doc("one"), by="t", comment="c"))
    lost = _results(history.apply_async(_doc("two"), by="t", comment="c"))
    last = _results(history.apply_async(_doc("three"), by="t", comment="c"))
    runner.run_next()
    runner.run_next()
    assert lost[0].check(PolicySuperseded)
    assert first[0].version == 1 and last[0].version == 2
    assert [i.version for i in history.versions()] == [2, 1]
    assert history.document(2)["access"]["rules"][0]["name"] == "three"


def test_a_slave_blob_is_installed_with_the_masters_number(tmp_path):
    store = PolicyStore(tmp_path)
    blob = canonical_bytes(_doc("one"))
    result = _results(store.install_blob_async(blob, 7, source="master"))
    assert result[0].version == 7 and store.current.version == 7 and store.current_source == "master"
    refused = _results(store.install_blob_async(b"{not json", 8))
    assert refused[0].check(PolicyError) and store.current.version == 7


def test_a_synchronous_apply_during_a_prepared_one_wins_and_the_cache_follows_it(tmp_path):
    store = PolicyStore(tmp_path)
    runner = ManualRunner()
    store.applier = PolicyApplier(runner)
    pending = _results(store.apply_document_async(_doc("async"), source="a"))
    # The job is prepared (cache written as version 1) but not swapped yet...
    fn, d = runner.jobs.pop(0)
    outcome = fn()
    store.apply_document(_doc("sync"), source="s")  # ...when another version takes number 1.
    d.callback(outcome)
    assert pending[0].check(PolicySuperseded)
    assert store.current.document["access"]["rules"][0]["name"] == "sync"
    assert b'"sync"' in store.cache_path.read_bytes()


def test_garbage_collection_pauses_while_jobs_run_and_resumes_after_the_last_one():
    import gc

    assert gc.isenabled()
    runner = ManualRunner()
    applier = PolicyApplier(runner)
    try:
        applier.submit(lambda: 1, lambda r: r)
        assert not gc.isenabled()
        applier.submit(lambda: 2, lambda r: r)
        runner.run_next()
        assert not gc.isenabled()  # the waiting job started at once
        runner.run_next()
        assert gc.isenabled()
    finally:
        gc.enable()


def test_the_pieces_make_the_canonical_bytes_exactly():
    import sys
    from pathlib import Path

    from safesquid_tw.policy.canonical_io import canonical_bytes_in_pieces, digest_of_bytes, record_bytes
    from safesquid_tw.policy.codec import digest

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    from big_policy import build_policy

    samples = [build_policy(50, 3000), _doc("x"), {}, {"a": [], "b": {"c": [1.5, None, True, "é\u2028"]}},
               {"list": list(range(1234)), "nested": [{"z": 1, "a": [2] * 600}] * 3}]
    for document in samples:
        data = canonical_bytes_in_pieces(document)
        assert data == canonical_bytes(document)
        assert digest_of_bytes(data) == digest(document)
        fields = {"version": 3, "digest": "sha256:x", "source": "file é"}
        assert record_bytes(fields, "policy", data) == canonical_bytes(dict(fields, policy=document))


def test_a_niced_applier_runs_its_jobs_at_lower_priority_in_its_own_thread_only():
    import os
    import threading

    from twisted.internet import defer

    from safesquid_tw.policy.applier import PolicyApplier

    def in_new_thread(fn, *args, **kwargs):
        box = {}
        thread = threading.Thread(target=lambda: box.setdefault("value", fn(*args, **kwargs)))
        thread.start()
        thread.join()
        return defer.succeed(box["value"])

    def niceness_here() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness_here()
    applier = PolicyApplier(in_new_thread, niceness=10, pause_gc=False)
    seen = []
    applier.submit(niceness_here, seen.append)
    assert seen == [min(before + 10, 19)] or seen == [10]
    assert niceness_here() == before, "the calling thread keeps its priority"
    plain = PolicyApplier(in_new_thread, pause_gc=False)
    plain.submit(niceness_here, seen.append)
    assert seen[-1] == before
