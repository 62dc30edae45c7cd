"""SIGHUP: the documented reload, on every role. It never stops the node.

Each part of a node that can reload registers a step (`add`): every role reopens its log files
(so an outside logrotate can move them away); a standalone node, and a master started with
`--policy`, load their policy file again (`assembly.parts.PolicyFileService`, which this service chains
to); a slave asks its master for the current policy version at once. A step that fails is logged
in one line and the others still run.
"""

from __future__ import annotations

import signal
from typing import Callable

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


class ReloadService(Service):
    """Owns SIGHUP while the node runs (installed last, so an earlier handler is chained to)."""

    name = "reload"

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.steps: list[tuple[str, Callable[[], object]]] = []
        self.reloads = 0
        self._previous = None
        self._installed = False

    def add(self, what: str, step: Callable[[], object]) -> None:
        self.steps.append((what, step))

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)
            self._installed = True
        except ValueError:  # not the main thread (tests): reload() is still callable
            self._installed = False

    def stopService(self):
        super().stopService()
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _on_signal(self, signum, frame) -> None:
        previous = self._previous
        if callable(previous):
            previous(signum, frame)  # e.g. the policy file's reload
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        self.reloads += 1
        log.info("SIGHUP: {steps}", steps="; ".join(what for what, _ in self.steps) or "nothing to reload")
        for what, step in self.steps:
            try:
                step()
            except Exception as e:
                log.error("SIGHUP: could not {what}: {why}", what=what, why=f"{type(e).__name__}: {e}")


__all__ = ["ReloadService"]
