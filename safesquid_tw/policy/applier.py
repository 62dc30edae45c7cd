"""Policy versions prepared off the reactor thread, one at a time, the newest pending one winning.

Validating, compiling and writing a big policy (1000 rules, 100k domains) costs about a second of
CPU; on the reactor thread that second would stall every request of the node. Here the expensive
part (`work`) runs in a worker thread of an injected runner, and only the swap (`commit`: one
reference assignment and the observers) runs back on the reactor thread.

Bounded: one job runs at a time and at most one waits. A job submitted while another one waits
supersedes it: the waiting job's Deferred fails with `PolicySuperseded` (nothing of it was done),
so a burst of pushes costs at most two preparations, whatever its length, and the last one wins.
A job that already started always finishes (its cache file may be written already).

The runner is injected: `thread_runner(reactor, pool)` in a node (a pool of its own with one
thread, so name look-ups in the reactor's pool never wait behind a policy), and
`synchronous_runner` in tests, which runs the work at once and makes every path deterministic.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.logger import Logger

from safesquid_tw.policy.release import release_in_pieces

_log = Logger()

# Seconds: the GIL's switch interval while a policy is prepared. Each system call of a request
# hands the GIL to the policy thread, and the reactor thread waits up to this long to get it back.
POLICY_SWITCH_INTERVAL = 0.0001
# Niceness of the policy thread in a process that serves no proxy traffic itself (a master, a
# node whose workers serve): preparing a version is background work, and on a machine it shares
# with proxy processes it should take the CPU only when they do not need it.
BACKGROUND_NICENESS = 10
T = TypeVar("T")
Runner = Callable[..., defer.Deferred]


class PolicySuperseded(Exception):
    """A newer policy was submitted before this one started; this one was not applied."""

    def __init__(self) -> None:
        super().__init__("a newer policy was submitted before this one was prepared; this one was not applied")


def synchronous_runner(fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred:
    """Runs the work at once, on the caller's thread (tests, and start-up before the reactor runs)."""
    return defer.maybeDeferred(fn, *args, **kwargs)


def thread_runner(reactor: Any, pool: ThreadPool) -> Runner:
    def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, pool, fn, *args, **kwargs)

    return run


def policy_thread_pool() -> ThreadPool:
    """One worker thread: policy jobs are serialised anyway, and a second thread would only take
    more of the CPU (and of the GIL) from the reactor."""
    return ThreadPool(minthreads=0, maxthreads=1, name="safesquid-policy")


def lower_thread_priority(niceness: int) -> bool:
    """Lower the calling thread's CPU priority (Linux: a thread is a task of its own). False where
    the system does not allow it; the work runs at normal priority then."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        return True
    except (OSError, AttributeError):
        return False


class PolicyApplier:
    """Runs policy jobs off the reactor thread, one at a time, newest pending wins.

    Counters (read by metrics and /health; plain attributes): `jobs_done`, `jobs_failed`
    (refused documents and write errors), `jobs_superseded`, `last_duration` (seconds from the
    start of the last finished job to its swap), `last_work_cpu` (CPU seconds of its worker
    thread), `busy` (a job is running), `pending` (a job waits).
    """

    def __init__(self, runner: Runner = synchronous_runner, *, clock: Callable[[], float] = time.monotonic,
                 pause_gc: bool = True, switch_interval: float | None = None, niceness: int = 0) -> None:
        self.runner = runner
        # Only for processes whose reactor serves no proxy traffic: in a process that does, the
        # niced thread could hold the GIL while the scheduler runs others, and the reactor waits.
        self.niceness = niceness
        self._niced = threading.local()
        # Python's cyclic garbage collector runs in whichever thread allocates, holding the GIL:
        # compiling a big policy allocates enough to trigger full collections of 30-70 ms each,
        # and every one of them stalls the reactor thread too. Collection waits while a job
        # runs (a second or so) and resumes after the swap; reference counting frees memory
        # meanwhile as always.
        self.pause_gc = pause_gc
        # While the worker computes, the reactor thread waits for the GIL each time it comes back
        # from a system call (a request makes several), up to the switch interval (5 ms by
        # default) each time. A shorter interval while a job runs keeps those waits short.
        self.switch_interval = switch_interval
        self._saved_switch_interval: float | None = None
        self._gc_paused = False
        self._gc_was_enabled = False
        self._clock = clock
        self.busy = False
        self._pending: tuple[Callable[[], Any], Callable[[Any], Any], defer.Deferred] | None = None
        self.jobs_done = 0
        self.jobs_failed = 0
        self.jobs_superseded = 0
        self.last_duration: float | None = None
        self.last_work_cpu: float | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def submit(self, work: Callable[[], T], commit: Callable[[T], Any]) -> defer.Deferred:
        """Run `work()` in the runner, then `commit(result)` on the calling (reactor) thread.

        The Deferred fires with what `commit` returns, fails with what `work` or `commit` raised,
        or with PolicySuperseded when a newer job replaced this one before it started.
        """
        done: defer.Deferred = defer.Deferred()
        if self._pending is not None:
            _work, _commit, older = self._pending
            self.jobs_superseded += 1
            older.errback(PolicySuperseded())
        self._pending = (work, commit, done)
        if not self.busy:
            self._start_next()
        return done

    def _start_next(self) -> None:
        if self._pending is None:
            return
        work, commit, done = self._pending
        self._pending = None
        self.busy = True
        if self.pause_gc and not self._gc_paused:
            self._gc_paused = True
            self._gc_was_enabled = gc.isenabled()
            gc.disable()
        if self.switch_interval is not None and self._saved_switch_interval is None:
            self._saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(self.switch_interval)
        started = self._clock()

        def timed_work() -> tuple[Any, float]:
            if self.niceness and not getattr(self._niced, "done", False):
                self._niced.done = True
                lower_thread_priority(self.niceness)
            cpu = time.thread_time()
            result = work()
            return result, time.thread_time() - cpu

        def finished(outcome: tuple[Any, float]) -> Any:
            result, cpu = outcome
            value = commit(result)  # on the reactor thread: the swap
            self.last_work_cpu = cpu
            self.last_duration = self._clock() - started
            return value

        d = self.runner(timed_work)
        d.addCallback(finished)
        d.addCallbacks(self._succeeded, self._failed)
        d.addBoth(self._next, done)

    def _succeeded(self, value: Any) -> Any:
        self.jobs_done += 1
        return value

    def _failed(self, failure: Any) -> Any:
        self.jobs_failed += 1
        return failure

    def _next(self, outcome: Any, done: defer.Deferred) -> None:
        self.busy = False
        # The next job starts only after this one's swap, so it prepares against the new version.
        self._start_next()
        if not self.busy and self._gc_paused:
            self._gc_paused = False
            if self._gc_was_enabled:
                gc.enable()
        if not self.busy and self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None
        if isinstance(outcome, Failure):
            done.errback(outcome)
        else:
            done.callback(outcome)

    def retire(self, replaced: Any) -> None:
        """Hand a replaced version to the worker, which frees it a piece at a time
        (policy/release.py) instead of all at once on the reactor thread. With the synchronous
        runner (tests, start-up) it is simply let go."""
        if self.runner is synchronous_runner:
            return
        box = [replaced]
        del replaced
        d = self.runner(release_in_pieces, box)
        d.addErrback(lambda failure: _log.failure("freeing a replaced policy version failed", failure))

    def stats(self) -> dict[str, Any]:
        return {
            "busy": self.busy,
            "pending": self.pending,
            "jobs_done": self.jobs_done,
            "jobs_failed": self.jobs_failed,
            "jobs_superseded": self.jobs_superseded,
            "last_duration": self.last_duration,
            "last_work_cpu": self.last_work_cpu,
        }


__all__ = [
    "PolicyApplier",
    "PolicySuperseded",
    "Runner",
    "policy_thread_pool",
    "synchronous_runner",
    "thread_runner",
]
