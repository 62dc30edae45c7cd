"""What the portal is built from: the node's role, its stores, and the reactor it runs on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet import defer, threads

from safesquid_tw.nodestate import NodeState


@attrs.define
class PortalContext:
    role: str  # "standalone" | "master" | "slave"
    state: NodeState
    state_dir: Path
    reactor: Any
    store: Any  # PolicyStore
    history: Any | None  # PolicyHistory; None on a slave (its master manages policy)
    registry: Any | None  # SlaveRegistry; masters only
    reports: Any | None  # ReportStore; masters and standalone nodes
    master_address: str | None = None  # slave: which master manages it
    startup_params: Any | None = None  # slave: .load() -> dict, .save(dict), .restart()
    # Runs blocking work (password hashes, report queries, file I/O) off the reactor thread.
    # The default is the reactor's thread pool; tests hand in a synchronous runner.
    in_thread: Callable[..., defer.Deferred] | None = None
    # Wall-clock time for audit lines, version times and report periods.
    wall_clock: Callable[[], float] | None = None
    ca_store: Any | None = None  # the inspection CA (proxy.intercept.ca.CAStore)

    def run_in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        if self.in_thread is not None:
            return self.in_thread(fn, *args, **kwargs)
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args, **kwargs)

    def now(self) -> float:
        """Wall-clock seconds: the injected `wall_clock`, else the reactor's."""
        return self.wall_clock() if self.wall_clock is not None else self.reactor.seconds()

    @property
    def read_only(self) -> bool:
        """Policy cannot be changed here (a slave's policy comes from its master)."""
        return self.history is None


__all__ = ["PortalContext"]
