"""A worker compiles the policy versions its parent sends in the thread runner it was given (not a
module-global pool): one at a time, the newest waiting one next, each acknowledged to the parent."""

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from safesquid_tw.config import NodeConfig
from safesquid_tw.policy.codec import digest
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.workers.child import Worker


def version(number: int, domain: str) -> dict:
    doc = validate_document({"format": "safesquid-policy/1", "access": {
        "default_action": "allow", "rules": [{"name": "r", "action": "deny", "domains": [domain]}]}})
    return {"t": "policy", "version": number, "digest": digest(doc), "doc": doc}


class HeldRunner:
    """Runs nothing until the test says so."""

    def __init__(self) -> None:
        self.jobs: list = []

    def __call__(self, fn, *args, **kwargs) -> defer.Deferred:
        d = defer.Deferred()
        self.jobs.append((d, fn, args, kwargs))
        return d

    def run_next(self) -> None:
        d, fn, args, kwargs = self.jobs.pop(0)
        d.callback(fn(*args, **kwargs))


def test_policy_versions_compile_in_the_injected_runner_one_at_a_time():
    runner = HeldRunner()
    worker = Worker(MemoryReactorClock(), NodeConfig(node_name="n1"), [], in_thread=runner)
    sent: list = []
    worker.pipe.send = sent.append
    worker.received(version(1, "one.test"))
    worker.received(version(2, "two.test"))
    worker.received(version(3, "three.test"))  # replaces 2 before it started
    assert len(runner.jobs) == 1 and sent == []
    runner.run_next()
    assert worker.policy.current.version == 1
    assert sent == [{"t": "policy", "version": 1, "error": None}]
    assert len(runner.jobs) == 1
    runner.run_next()
    assert worker.policy.current.version == 3
    assert sent[-1] == {"t": "policy", "version": 3, "error": None}
    # The replaced version 1 is freed in the thread too, a piece at a time.
    assert [job[1].__name__ for job in runner.jobs] == ["release_in_pieces"]
    assert [p.version for p in runner.jobs[0][2][0]] == [1]
    runner.run_next()
    assert runner.jobs == []
