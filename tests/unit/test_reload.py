"""ReloadService: SIGHUP runs every reload step (a failing one does not stop the others), chains
to a handler installed before it, and gives SIGHUP back when the node stops."""

from __future__ import annotations

import os
import signal

from safesquid_tw.reload import ReloadService


class InlineReactor:
    def callFromThread(self, fn, *args):
        fn(*args)


def test_sighup_runs_every_step_and_chains_to_the_earlier_handler():
    calls: list[str] = []
    before = signal.signal(signal.SIGHUP, lambda signum, frame: calls.append("earlier handler"))
    try:
        service = ReloadService(InlineReactor())
        service.add("first", lambda: calls.append("first"))
        service.add("broken", lambda: 1 / 0)
        service.add("last", lambda: calls.append("last"))
        service.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        assert calls == ["earlier handler", "first", "last"]
        assert service.reloads == 1
        service.stopService()
        os.kill(os.getpid(), signal.SIGHUP)  # the earlier handler is back
        assert calls[-1] == "earlier handler" and service.reloads == 1
    finally:
        signal.signal(signal.SIGHUP, before)
