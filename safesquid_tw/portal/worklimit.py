"""Bounded concurrency for the portal's heavy work (password hashing, large JSON, form parsing).

Each kind of heavy work gets a `WorkLimiter`: at most `concurrency` jobs run in worker threads at
once and at most `max_waiting` more wait their turn; past that the caller is told `Busy` at once,
before any work is done. The reactor's thread pool is shared with the proxy (name look-ups), so
a flood of portal requests must not fill it: a handful of argon2 checks at a time costs a
bounded amount of memory (64 MiB each) and leaves threads for everything else.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer


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


__all__ = ["Busy", "WorkLimiter"]
