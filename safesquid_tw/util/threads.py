"""How blocking work (disk, SQLite) leaves the reactor thread, as a value that can be injected.

A `ThreadRunner` is called like `deferToThread`. Services take one (default: the reactor's
pool), so unit tests hand in `inline` and drive the timer paths with `task.Clock` alone.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, threads

ThreadRunner = Callable[..., defer.Deferred]


def pool_runner(reactor: Any) -> ThreadRunner:
    """The thread pool of `reactor` (the one a node is built on): what every part of a node runs
    its blocking work in."""

    def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)

    return run


def reactor_pool(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """The global reactor's thread pool (looked up at call time): the default of a part built on
    its own; a node hands its parts `pool_runner(reactor)` instead."""
    from twisted.internet import reactor

    return pool_runner(reactor)(fn, *args, **kwargs)


def inline(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """Run at once on the caller's thread: for tests."""
    return defer.maybeDeferred(fn, *args, **kwargs)
