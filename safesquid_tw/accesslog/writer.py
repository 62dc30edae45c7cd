"""The local access log: one JSON line per request, written in batches, rotated by size.

`write()` is on every request's path, so it only appends to a list; a periodic flush turns the
batch into one `write(2)`. Other consumers (the cluster's log spool) register a sink and see every
record as it arrives.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from safesquid_tw.accesslog.record import AccessRecord
from safesquid_tw.util.periodic import Periodic
from safesquid_tw.util.rotating import RotatingFile

_log = Logger()

Sink = Callable[[AccessRecord], None]


class AccessLogWriter(Service):
    """Writes `<state-dir>/logs/access.log` (mode 0640), keeping `keep` rotated files.

    Counters for the status pages: `written` (records on disk), `dropped` (records lost to an
    unwritable disk or an unencodable value) and `sink_errors`.
    """

    def __init__(
        self,
        path: str,
        *,
        rotate_bytes: int,
        keep: int,
        clock: IReactorTime,
        flush_interval: float = 0.2,
        max_pending: int = 10000,
    ) -> None:
        self.path = path
        self.written = 0
        self.dropped = 0
        self.sink_errors = 0
        self._file = RotatingFile(path, rotate_bytes=rotate_bytes, keep=keep, mode=0o640)
        self._pending: list[bytes] = []  # encoded lines
        self._max_pending = max_pending
        self._sinks: list[Sink] = []
        self._line_sinks: list[Callable[[bytes], None]] = []
        self._failed_sinks: list[Sink] = []
        self._flusher = Periodic(flush_interval, self.flush, clock=clock, name="access log flush")
        self._stopped = False
        self._failing = False

    def add_sink(self, fn: Sink) -> None:
        """Also hand every record to `fn` (called synchronously from `write`; keep it cheap)."""
        self._sinks.append(fn)

    def add_line_sink(self, fn: Callable[[bytes], None]) -> None:
        """Also hand every record's JSON line to `fn` (the spool): encoded once for everyone."""
        self._line_sinks.append(fn)

    def write(self, record: AccessRecord) -> None:
        try:
            line = record.to_json_line()
        except (ValueError, TypeError) as e:
            self.dropped += 1
            _log.error("access record dropped, it cannot be encoded ({error}): {record!r}", error=e, record=record)
            line = None
        if line is not None:
            self._pending.append(line)
        for sink in self._sinks:
            self._call_sink(sink, record)
        if line is not None:
            for line_sink in self._line_sinks:
                self._call_sink(line_sink, line)
        # A burst larger than a flush interval can hold, or a request finishing after stop:
        # write now rather than grow without bound or lose the record.
        if self._stopped or len(self._pending) >= self._max_pending:
            self.flush()

    def write_line(self, line: bytes) -> None:
        """A record already encoded by `to_json_line` (a worker process did it): to the file and
        the line sinks; record sinks are not called."""
        self._pending.append(line)
        for line_sink in self._line_sinks:
            self._call_sink(line_sink, line)
        if self._stopped or len(self._pending) >= self._max_pending:
            self.flush()

    def _call_sink(self, sink, value) -> None:
        try:
            sink(value)
        except Exception:
            self.sink_errors += 1
            if sink not in self._failed_sinks:
                # Logged once per sink: a broken sink must not flood the log at request rate.
                self._failed_sinks.append(sink)
                _log.failure("access log sink {sink!r} failed; further failures are only counted",
                             level=LogLevel.error, sink=sink)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Write every pending record with one write call."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._file.write(b"".join(lines))
        except OSError as e:
            self.dropped += len(lines)
            if not self._failing:
                # Once per outage, not five times a second.
                _log.error("cannot write access log {path}: {error}; records are being dropped",
                           path=self.path, error=e)
            self._failing = True
            return
        if self._failing:
            _log.info("access log {path} writable again; {dropped} records dropped so far",
                      path=self.path, dropped=self.dropped)
            self._failing = False
        self.written += len(lines)

    def reopen(self) -> None:
        """Write what is pending and close the file; the next write opens `path` again."""
        self.flush()
        self._file.close()

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._flusher.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopped = True
        stopped = self._flusher.stopService()
        self.flush()
        self._file.close()
        return stopped


__all__ = ["AccessLogWriter"]
