"""A periodic task that survives its own errors.

`twisted.internet.task.LoopingCall` stops for good after the first exception its function raises
(or the first failed Deferred it returns). A node's timers (log flushes, policy polls, spool
shipping) must keep going whatever one run does, so every failure is logged and swallowed here.
"""

from __future__ import annotations

import inspect
from typing import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

_log = Logger()


class Periodic(Service):
    """Call `fn` every `interval` seconds while the service runs.

    If `fn` returns a Deferred (or a coroutine), the next run is scheduled only after it fires, so
    runs never overlap. `now=True` runs `fn` at start-up as well; otherwise the first run comes
    one interval after start.

    `task_name` names the task in log messages; it is deliberately not the Service's `name`,
    so that two tasks with the same label never clash inside one MultiService.
    """

    def __init__(
        self,
        interval: float,
        fn: Callable[[], object],
        *,
        clock: IReactorTime,
        name: str,
        now: bool = False,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"periodic task {name}: interval must be positive, not {interval!r}")
        self.interval = interval
        self.task_name = name
        self.runs = 0
        self.failures = 0
        self._fn = fn
        self._clock = clock
        self._now = now
        self._loop: LoopingCall | None = None
        self._in_flight: Deferred[None] | None = None
        self._idle_waiters: list[Deferred[None]] = []

    def startService(self) -> None:
        if self._loop is not None:
            return
        super().startService()
        loop = LoopingCall(self._run_once)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self.interval, now=self._now).addErrback(self._loop_died)

    def stopService(self) -> Deferred[None]:
        """Stop scheduling runs; the result fires once a run in progress (if any) has finished."""
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return self.wait_idle()

    def wait_idle(self) -> Deferred[None]:
        """A Deferred that fires when no run is in progress."""
        if self._in_flight is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def _run_once(self) -> Deferred[None] | None:
        self.runs += 1
        try:
            result = self._fn()
            if inspect.iscoroutine(result):
                result = Deferred.fromCoroutine(result)
        except Exception:
            self._record_failure(Failure())
            return None
        if not isinstance(result, Deferred):
            return None
        in_flight: Deferred[None] = result.addCallbacks(lambda _ignored: None, self._record_failure)
        if in_flight.called:
            return None
        self._in_flight = in_flight
        in_flight.addBoth(self._run_finished)
        # LoopingCall waits for this before scheduling the next run.
        return in_flight

    def _run_finished(self, result: None) -> None:
        self._in_flight = None
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return result

    def _record_failure(self, failure: Failure) -> None:
        self.failures += 1
        _log.failure("periodic task {task} failed; it runs again in {interval}s", failure,
                     level=LogLevel.error, task=self.task_name, interval=self.interval)
        return None

    def _loop_died(self, failure: Failure) -> None:
        # Cannot happen while _run_once swallows everything; logged rather than lost if it does.
        _log.failure("periodic task {task} stopped unexpectedly", failure, task=self.task_name)
        self._loop = None


__all__ = ["Periodic"]
