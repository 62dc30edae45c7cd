"""A worker process keeps its running policy out of the garbage collector: no collection while a
version compiles, the heap frozen right after the swap (policy/heapfreeze.py), the collector back
on afterwards, also when the version is refused."""

from __future__ import annotations

import gc

import pytest
from twisted.internet.testing import MemoryReactorClock

from safesquid_tw.config import NodeConfig
from safesquid_tw.policy.heapfreeze import HeapFreezer
from safesquid_tw.workers.child import Worker
from safesquid_tw.workers.policydelta import change_message, whole_message

from tests.unit.policy.test_heapfreeze import FakeCollector, freezer_with
from tests.unit.workers.test_policydelta import HeldRunner, document, policy, through_the_pipe


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was:
            gc.disable()


def _worker(heap: HeapFreezer | None) -> tuple[Worker, HeldRunner, list]:
    runner = HeldRunner()
    worker = Worker(MemoryReactorClock(), NodeConfig(node_name="n1"), [], in_thread=runner)
    worker.heap = heap
    sent: list = []
    worker.pipe.send = sent.append
    return worker, runner, sent


def test_a_version_compiles_with_the_collector_paused_and_is_frozen_after_the_swap(collector_on):
    fake = FakeCollector()
    worker, runner, sent = _worker(freezer_with(fake))
    frozen_when_installed: list = []
    worker.policy.add_observer(lambda p: frozen_when_installed.append(list(fake.calls)))
    v1 = policy(1, document())
    worker.received(through_the_pipe(whole_message(v1)))
    assert not gc.isenabled()  # the compile waits in the runner: no collection meanwhile
    runner.run_all()
    assert gc.isenabled() and worker.policy.current.version == 1
    assert frozen_when_installed == [[]]  # the observers ran first, then the freeze
    assert fake.calls == ["unfreeze", "collect", "freeze"]  # the first version: before it accepts
    # A big change goes to the thread, with the collector paused as well.
    v2 = policy(2, document(games=tuple(f"site{i}.games.test" for i in range(3000))))
    worker.received(through_the_pipe(change_message(v1, v2)))
    assert not gc.isenabled() and runner.jobs
    runner.run_all()
    assert gc.isenabled() and worker.policy.current.version == 2 and sent[-1]["version"] == 2
    assert fake.calls[3:] == ["freeze"]
    # A small one compiles at once on the reactor thread: nothing for the thread, frozen all the same.
    v3 = policy(3, dict(v2.document, comment="three"))
    worker.received(through_the_pipe(change_message(v2, v3)))
    assert not runner.jobs and gc.isenabled()
    assert worker.policy.current.version == 3 and sent[-1] == {"t": "policy", "version": 3, "error": None}
    assert worker.policy.current.document == v3.document
    assert fake.calls[4:] == ["freeze"]


def test_a_refused_version_turns_the_collector_back_on(collector_on):
    fake = FakeCollector()
    worker, runner, sent = _worker(freezer_with(fake))
    worker.received(through_the_pipe(whole_message(policy(1, document()))))
    runner.run_all()
    worker.received({"t": "policy", "version": 2, "digest": "x", "doc": "not a document"})
    runner.run_all()
    assert gc.isenabled() and worker.policy.current.version == 1 and sent[-1]["error"]
    assert fake.calls == ["unfreeze", "collect", "freeze"]


def test_without_a_freezer_the_collector_is_left_alone(collector_on):
    worker, runner, _sent = _worker(None)
    worker.received(through_the_pipe(whole_message(policy(1, document()))))
    assert gc.isenabled()
    runner.run_all()
    assert gc.isenabled() and worker.policy.current.version == 1
