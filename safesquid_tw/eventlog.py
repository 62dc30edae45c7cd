"""The event log: every `twisted.logger` message of the node as one readable, rotating text file.

Lines look like `2026-11-22T03:07:19Z INFO [safesquid_tw.policy.store] policy version 7 active`.
A message that spans lines (a traceback) continues on lines that start with a tab, so every line
that starts with a timestamp is the start of one event, and a hostile string with a line break in
it cannot forge an entry.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.logger import ILogObserver, LogLevel, LogPublisher, eventAsText, globalLogPublisher
from zope.interface import implementer

from safesquid_tw.util.rotating import RotatingFile

_PRIORITY = {level: index for index, level in enumerate(LogLevel.iterconstants())}
_LEVEL_NAMES = {level: level.name.upper() for level in LogLevel.iterconstants()}


def format_event_line(event: dict[str, Any]) -> str | None:
    """The event as one entry (ending in a newline), or None if it has no text at all."""
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    if not text:
        return None
    when = event.get("log_time")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if when is None else when))
    level = _LEVEL_NAMES.get(event.get("log_level"), "INFO")  # type: ignore[arg-type]
    system = event.get("log_system") or event.get("log_namespace") or "-"
    if "\n" in text or "\r" in text:
        text = text.rstrip("\n").replace("\r", "\\r").replace("\n", "\n\t")
    return f"{stamp} {level} [{system}] {text}\n"


@implementer(ILogObserver)
class EventLogObserver:
    """Writes events at or above `min_level` to a RotatingFile (mode 0640).

    Never logs anything itself (that would loop back into it); a failed write is counted in
    `dropped` instead.
    """

    def __init__(self, path: str, *, rotate_bytes: int, keep: int, min_level: LogLevel = LogLevel.info) -> None:
        self.path = path
        self.dropped = 0
        self._min_priority = _PRIORITY[min_level]
        self._file = RotatingFile(path, rotate_bytes=rotate_bytes, keep=keep, mode=0o640)
        # Events can be emitted from threads (e.g. name lookups in the thread pool).
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, event: dict[str, Any]) -> None:
        if _PRIORITY.get(event.get("log_level"), 1) < self._min_priority:  # type: ignore[arg-type]
            return
        try:
            line = format_event_line(event)
        except Exception:
            self.dropped += 1
            return
        if line is None:
            return
        data = line.encode("utf-8", "backslashreplace")
        with self._lock:
            if self._closed:
                return
            try:
                self._file.write(data)
            except OSError:
                self.dropped += 1

    def reopen(self) -> None:
        """Close the file; the next event opens `path` again (after an outside rotation)."""
        with self._lock:
            self._file.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._file.close()


def start_event_log(
    path: str,
    *,
    rotate_bytes: int,
    keep: int,
    min_level: LogLevel = LogLevel.info,
    publisher: LogPublisher | None = None,
) -> EventLogObserver:
    """Open `<state-dir>/logs/extended.log` and add it to the global log publisher.

    The observer sits beside twistd's own log observer, so messages go to both.
    """
    observer = EventLogObserver(path, rotate_bytes=rotate_bytes, keep=keep, min_level=min_level)
    (publisher or globalLogPublisher).addObserver(observer)
    return observer


def stop_event_log(observer: EventLogObserver, *, publisher: LogPublisher | None = None) -> None:
    """Remove the observer from the publisher and close its file."""
    (publisher or globalLogPublisher).removeObserver(observer)
    observer.close()


__all__ = ["EventLogObserver", "format_event_line", "start_event_log", "stop_event_log"]
