import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from safesquid_tw.util.periodic import Periodic


def test_keeps_running_after_an_exception():
    clock = Clock()
    calls = []

    def explode():
        calls.append(clock.seconds())
        raise RuntimeError("boom")

    task = Periodic(5, explode, clock=clock, name="exploder", now=True)
    with capturedLogs() as events:
        task.startService()
        clock.pump([5, 5, 5])
    assert calls == [0, 5, 10, 15]
    assert task.failures == 4
    assert task.running
    messages = [e for e in events if e.get("task") == "exploder"]
    assert len(messages) == 4 and all("log_failure" in e for e in messages)
    task.stopService()


def test_first_run_waits_one_interval_unless_now():
    clock = Clock()
    calls = []
    task = Periodic(2, lambda: calls.append(clock.seconds()), clock=clock, name="t")
    task.startService()
    assert calls == []
    clock.advance(2)
    assert calls == [2]
    task.stopService()
    clock.advance(10)
    assert calls == [2]
    assert not clock.getDelayedCalls()


def test_failed_deferred_does_not_stop_the_loop():
    clock = Clock()
    pending: list[Deferred] = []

    def start_run():
        d = Deferred()
        pending.append(d)
        return d

    task = Periodic(1, start_run, clock=clock, name="async", now=True)
    with capturedLogs():
        task.startService()
        pending[0].errback(ValueError("remote gone"))
        clock.advance(1)
    assert len(pending) == 2
    assert task.failures == 1
    task.stopService()


def test_runs_never_overlap_while_a_deferred_is_pending():
    clock = Clock()
    pending: list[Deferred] = []

    def start_run():
        d = Deferred()
        pending.append(d)
        return d

    task = Periodic(1, start_run, clock=clock, name="slow", now=True)
    task.startService()
    clock.advance(10)
    assert len(pending) == 1
    assert task.busy
    pending[0].callback("anything")
    assert not task.busy
    clock.advance(1)
    assert len(pending) == 2
    task.stopService()


def test_stop_returns_a_deferred_that_waits_for_the_run_in_flight():
    clock = Clock()
    in_flight = Deferred()
    task = Periodic(1, lambda: in_flight, clock=clock, name="ship", now=True)
    task.startService()
    stopped = task.stopService()
    assert not stopped.called
    in_flight.callback(None)
    assert stopped.called
    assert not task.running


def test_stop_when_idle_fires_at_once():
    clock = Clock()
    task = Periodic(1, lambda: None, clock=clock, name="idle")
    task.startService()
    assert task.stopService().called


def test_coroutine_functions_are_awaited():
    clock = Clock()
    done = []

    async def work():
        done.append(True)
        raise KeyError("inside a coroutine")

    task = Periodic(1, work, clock=clock, name="coro", now=True)
    with capturedLogs():
        task.startService()
        clock.advance(1)
    assert done == [True, True]
    assert task.failures == 2
    task.stopService()


@pytest.mark.parametrize("interval", [0, -1])
def test_interval_must_be_positive(interval):
    with pytest.raises(ValueError, match="interval"):
        Periodic(interval, lambda: None, clock=Clock(), name="bad")
