"""How blocking work (disk, SQLite) leaves the reactor thread, as a value that can be injected.

A `ThreadRunner` is called like `deferToThread`. Services take one (default: the reactor's
pool), so unit tests hand in `inline` and drive the timer paths with `task.Clock` alone.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, threads

ThreadRunner = Callable[..., defer.Deferred]


def reactor_pool(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """The reactor's thread pool (looked up at call time)."""
    return threads.deferToThread(fn, *args, **kwargs)


def inline(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """Run at once on the caller's thread: for tests."""
    return defer.maybeDeferred(fn, *args, **kwargs)
