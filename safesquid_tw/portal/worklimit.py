"""Bounded concurrency for the portal's heavy work (password hashing, large JSON, form parsing).

Each kind of heavy work gets a `WorkLimiter`: at most `concurrency` jobs run in worker threads at
once and at most `max_waiting` more wait their turn; past that the caller is told `Busy` at once,
before any work is done. The reactor's thread pool is shared with the proxy (name look-ups), so
a flood of portal requests must not fill it: a handful of argon2 checks at a time costs a
bounded amount of memory (64 MiB each) and leaves threads for everything else.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool


class Busy(Exception):
    """Too much of this work is running or waiting already: answer 503 with Retry-After."""


class WorkLimiter:
    def __init__(self, run_in_thread: Callable[..., defer.Deferred], *, concurrency: int, max_waiting: int) -> None:
        self._run_in_thread = run_in_thread
        self._semaphore = defer.DeferredSemaphore(concurrency)
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self.running = 0
        self.peak_running = 0
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._semaphore.waiting)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """`fn(*args, **kwargs)` in a worker thread when a slot is free; fails with Busy at once
        when the queue is full."""
        if self._semaphore.tokens == 0 and self.waiting >= self.max_waiting:
            self.refused += 1
            return defer.fail(Busy(f"{self.running} running, {self.waiting} waiting"))

        def start(_: object) -> defer.Deferred:
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
            d = self._run_in_thread(fn, *args, **kwargs)

            def done(result: object) -> object:
                self.running -= 1
                self._semaphore.release()
                return result

            return d.addBoth(done)

        return self._semaphore.acquire().addCallback(start)


def niced_pool(reactor: Any, name: str, size: int, niceness: int = 10) -> Callable[..., defer.Deferred]:
    """A `run_in_thread` over a pool of its own whose threads run at a lower CPU priority.

    Password hashing is CPU-bound by design: on a small machine two argon2 checks would take
    every core from the reactor thread, which serves the proxy. Threads of this pool lower their
    own priority (Linux schedules threads one by one) before their first job, and the pool is
    apart from the reactor's, which name look-ups use."""
    pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
    lowered = threading.local()

    def lower_then(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not getattr(lowered, "done", False):
            lowered.done = True
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
            except (OSError, AttributeError):
                pass  # not permitted or not Linux: the pool still bounds the work
        return fn(*args, **kwargs)

    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, pool, lower_then, fn, *args, **kwargs)

    return run


__all__ = ["Busy", "WorkLimiter", "niced_pool"]
