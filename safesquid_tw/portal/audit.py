"""The audit log: `<state-dir>/logs/audit.log`, one JSON line per administrative act.

Logins (ok and failed), logouts, policy applies and rollbacks, restores, token and account
changes, and tasks sent to nodes. Each line is written and synced before the act is reported
done: these are rare events, and an audit trail that loses its last lines in a crash is no trail.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from twisted.logger import Logger

_log = Logger()


class AuditLog:
    def __init__(self, state_dir: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / "logs" / "audit.log"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clock = clock

    def record(self, event: str, *, actor: str | None, address: str | None, **fields: Any) -> None:
        now = self._clock()
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "ts": round(now, 3),
            "event": event,
            "actor": actor,
            "address": address,
            **fields,
        }
        line = json.dumps(entry, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            # The act itself has happened; say loudly that its trace is missing.
            _log.error("audit log {path} not written ({error}): {line}", path=str(self.path), error=str(e),
                       line=line.decode("utf-8", "replace").strip())

    def tail(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` entries, newest first (blocking: read in a thread)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - limit * 1024))
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in reversed(lines[-limit:]):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # the first line of the window may be cut
        return entries


__all__ = ["AuditLog"]
