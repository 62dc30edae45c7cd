"""Is the directory reachable? Asked every half minute, so the cluster view and /health say so
before the first user finds out (the proxy otherwise learns it only from a login)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

from safesquid_tw.util.periodic import Periodic

INTERVAL = 30.0


def _state(current_policy: Callable[[], Any]):
    policy = current_policy()
    directory = getattr(getattr(policy, "compiled", None), "directory", None)
    return directory.state if directory is not None else None


def directory_health(current_policy: Callable[[], Any]) -> dict[str, Any] | None:
    """The directory's part of /health JSON (None when the policy names no directory)."""
    state = _state(current_policy)
    return state.stats() if state is not None else None


def directory_summary(current_policy: Callable[[], Any]) -> str | None:
    """One line for the cluster view: reachable, unreachable (why), or not checked yet."""
    state = _state(current_policy)
    if state is None:
        return None
    if state.reachable is None:
        return "not checked yet"
    return "reachable" if state.reachable else f"unreachable: {state.last_error}"[:300]


def summary_of(stats: dict[str, Any] | None) -> str | None:
    """directory_summary for figures already gathered (a node with workers merges theirs)."""
    if not stats:
        return None
    if stats.get("reachable") is None:
        return "not checked yet"
    return "reachable" if stats["reachable"] else f"unreachable: {stats.get('last_error')}"[:300]


def directory_watch(reactor, pool: ThreadPool, current_policy: Callable[[], Any]) -> Periodic:
    def check():
        state = _state(current_policy)
        if state is None:
            return None
        d = threads.deferToThreadPool(reactor, pool, state.probe)
        d.addErrback(lambda _failure: None)  # the state has noted it; the periodic task goes on
        return d

    return Periodic(INTERVAL, check, clock=reactor, name="directory check", now=True)




class DirectoryCollector:
    """The user directory in /metrics: reachable, look-ups and failures, remembered users."""

    def __init__(self, current_policy: Callable[[], Any], stats: Callable[[], Any] | None = None) -> None:
        self.current_policy = current_policy
        self.stats = stats  # figures of several processes merged (a node with workers)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = _state(self.current_policy)
        if state is None:
            return
        stats = (self.stats() if self.stats is not None else None) or state.stats()
        reachable = stats["reachable"]
        if reachable is not None:
            yield GaugeMetricFamily("safesquid_directory_reachable", "1 when the user directory answered the last "
                                    "look-up or check, 0 when it did not (absent until the first)",
                                    value=1.0 if reachable else 0.0)
        yield CounterMetricFamily("safesquid_directory_lookups", "Binds and searches sent to the user directory",
                                  value=stats["lookups"])
        yield CounterMetricFamily("safesquid_directory_failures", "Directory look-ups that found no server answering",
                                  value=stats["failures"])
        yield GaugeMetricFamily("safesquid_directory_cached_verdicts", "Directory verdicts remembered now",
                                value=stats["cached_users"])


__all__ = ["DirectoryCollector", "directory_health", "directory_summary", "directory_watch"]
