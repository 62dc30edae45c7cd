"""Getting every finished request's record into the spool's files: write per reactor turn,
fsync on a group-commit timer, hold records in memory while the disk refuses them.

The promise (README "Operations", docs/ARCHITECTURE.md "Durability of access records"):

- A record is appended when its request finishes. Before the reactor next waits for I/O, a call
  scheduled with `callLater(0)` hands every record of that turn to the kernel with `write(2)` on
  the open spool segment. A process crash (SIGKILL, OOM kill, a bug) therefore loses no finished
  request's record; the client's last response bytes leave only after its record was written.
- `fsync` runs every `fsync_interval` seconds (`--spool-fsync-interval`, default 1 s) in a worker
  thread. Only a machine crash (power, kernel) can lose the records of that last window.
- When the spool cannot be written (full disk, read-only file system, permissions), the node
  keeps proxying; records wait in memory up to `memory_bytes` (`--spool-memory-bytes`, default
  64 MiB), after which new records are dropped and counted (with the spool cap's drops, in
  `dropped_records`). The writer retries every `retry_interval`; once a write succeeds, the
  backlog goes out in pieces of `piece_bytes` per reactor turn, so other work keeps its turns.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from safesquid_tw.accesslog.spool import Spool
from safesquid_tw.util.periodic import Periodic
from safesquid_tw.util.threads import ThreadRunner, reactor_pool

log = Logger()

DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
PIECE_BYTES = 1024 * 1024


class SpoolWriter(Service):
    """The spool's only writer on the reactor side; `append` is the access log's line sink."""

    name = "spool-writer"

    def __init__(
        self,
        reactor,
        spool: Spool,
        *,
        fsync_interval: float = 1.0,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        piece_bytes: int = PIECE_BYTES,
        retry_interval: float = 1.0,
        wall_clock=time.time,
        in_thread: ThreadRunner = reactor_pool,
    ) -> None:
        self.reactor = reactor
        self.in_thread = in_thread  # where fsync runs
        self.spool = spool
        self.memory_bytes = memory_bytes
        self.piece_bytes = piece_bytes
        self.retry_interval = retry_interval
        self._wall_clock = wall_clock
        # What the status pages and /metrics read.
        self.writable = True
        self.reason: str | None = None  # why the spool cannot be written, while it cannot
        self.failing_since: float | None = None
        self.dropped_in_memory = 0  # records refused because the memory bound was reached
        self.sync_failures = 0
        self._last_sync_error: object = None  # the last problem told: (errno, strerror) or a message
        self._dropping = False
        self._turn = None  # the pending callLater(0) or retry call
        self._after: list[Callable[[], None]] = []  # sends waiting for this turn's write (after_records)
        self._syncer = Periodic(fsync_interval, self.sync, clock=reactor, name="spool fsync")

    # -- the record path ----------------------------------------------------------------------

    def append(self, line: bytes) -> None:
        """Queue one record and make sure it is written before the reactor waits for I/O."""
        spool = self.spool
        if spool.pending_bytes + len(line) > self.memory_bytes:
            self.dropped_in_memory += 1
            spool.count_dropped(1)
            if not self._dropping:
                self._dropping = True
                log.error(
                    "access record spool: {held} bytes held in memory (the bound, --spool-memory-bytes) "
                    "while the spool cannot be written ({reason}); further records are dropped and counted",
                    held=spool.pending_bytes, reason=self.reason,
                )
            return
        spool.append(line)
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._turn is None or not self._turn.active():
            if not self.writable and delay == 0:
                return  # the retry timer is already set
            self._turn = self.reactor.callLater(delay, self.write_now)

    def write_due(self) -> None:
        """Write this turn's records now rather than at the end of the turn: called before a
        response's last bytes are sent straight to the socket (proxy/directwrite.py), so the
        client never sees a request complete whose record has not reached the kernel. A backlog
        (the disk refused writes) or a draining one keeps its own pace."""
        turn = self._turn
        if turn is None or not self.writable or self.spool.pending_bytes > self.piece_bytes:
            return
        if turn.active():
            turn.cancel()
        self.write_now()

    def after_records(self, send: Callable[[], None]) -> None:
        """Call `send` once the records appended so far are written: at the end of this turn,
        with them (one write(2) for every response of the turn), or at once when none wait.
        Responses sent straight to a socket (proxy/directwrite.py) go through here, so a client
        never sees a request complete whose record has not reached the kernel. While the disk
        refuses writes, nothing is held back: the records wait in memory, the responses do not."""
        turn = self._turn
        if self.writable and turn is not None and turn.active():
            self._after.append(send)
        else:
            send()

    def write_now(self) -> None:
        """Write what is buffered (a piece per turn while a backlog drains); never raises."""
        self._turn = None
        spool = self.spool
        backlog = spool.pending_bytes > self.piece_bytes
        try:
            spool.write_out(self.piece_bytes if backlog else None)
        except OSError as e:
            self._failed(e)
            self._schedule(self.retry_interval)
        else:
            if not self.writable:
                self._recovered()
            if spool.pending_bytes:
                self._schedule(0)  # the rest of a backlog, one piece per reactor turn
        self._send_held()

    def _send_held(self) -> None:
        held, self._after = self._after, []
        for send in held:
            try:
                send()
            except Exception:
                log.failure("sending a response held for its record")

    def _failed(self, error: OSError) -> None:
        reason = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        if self.writable or reason != self.reason:
            log.error(
                "access record spool cannot be written ({reason}); the node keeps proxying and holds "
                "records in memory (up to {bound} bytes, --spool-memory-bytes)",
                reason=reason, bound=self.memory_bytes,
            )
        if self.writable:
            self.failing_since = self._wall_clock()
        self.writable = False
        self.reason = reason

    def _recovered(self) -> None:
        log.info(
            "access record spool writable again after {seconds:.0f} s; {pending} bytes held in memory "
            "are being written in pieces; {dropped} records dropped meanwhile",
            seconds=self._wall_clock() - (self.failing_since or self._wall_clock()),
            pending=self.spool.pending_bytes, dropped=self.dropped_in_memory,
        )
        self.writable = True
        self.reason = None
        self.failing_since = None
        self._dropping = False

    # -- group commit ---------------------------------------------------------------------------

    def sync(self) -> defer.Deferred:
        """fsync (and the cap) in a worker thread; failures are counted and logged, not raised."""
        d = self.in_thread(self.spool.sync)
        d.addCallbacks(self._synced, self._sync_failed)
        return d

    def _sync_failed(self, reason) -> None:
        self.sync_failures += 1
        why = reason.getErrorMessage()
        # The same problem on another temporary file name is the same problem.
        kind = (reason.value.errno, reason.value.strerror) if reason.check(OSError) else why
        if (reason.check(OSError) and not self.writable) or kind == self._last_sync_error:
            return  # already told: once per distinct problem, not once a second
        self._last_sync_error = kind
        log.error("access record spool: fsync failed: {why}", why=why)

    def _synced(self, _ignored) -> None:
        if self._last_sync_error is not None:
            log.info("access record spool: fsync works again")
            self._last_sync_error = None

    # -- what /health, the cluster view and /metrics show ----------------------------------------

    def stats(self) -> dict[str, Any]:
        spool = self.spool
        return {
            "backlog_records": spool.backlog_records,
            "backlog_bytes": spool.backlog_bytes,
            "memory_records": spool.pending_records,
            "memory_bytes": spool.pending_bytes,
            "dropped_records": spool.dropped_records,
            "writable": self.writable,
            "reason": self.reason,
            "failing_since": self.failing_since,
        }

    # -- lifetime ---------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._syncer.startService()

    def stopService(self):
        super().stopService()
        if self._turn is not None and self._turn.active():
            self._turn.cancel()
        self._turn = None
        try:
            self.spool.write_out()
        except OSError as e:
            log.error("access record spool: {n} bytes could not be written at shutdown: {why}",
                      n=self.spool.pending_bytes, why=str(e))
        self._send_held()
        return self._syncer.stopService()


__all__ = ["DEFAULT_MEMORY_BYTES", "SpoolWriter"]
