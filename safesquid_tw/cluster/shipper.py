"""Moving access records from the node's spool to where reports are built.

A slave ships to its master over the control plane; a standalone node hands them to its own report
store. Either way a segment is deleted only after every batch of it was acknowledged as stored, so
a crash on either side costs nothing but a resend (which the store recognises and ignores).
All disk work runs in threads; the reactor only decides what to do next.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from safesquid_tw.accesslog.spool import Batch, Spool
from safesquid_tw.util.threads import ThreadRunner, reactor_pool

log = Logger()

Sender = Callable[[Batch], defer.Deferred]


class LogShipper(Service):
    name = "log-shipper"

    def __init__(self, reactor, spool: Spool, *, interval: float = 0.5, seal_after: float = 1.0,
                 in_thread: ThreadRunner = reactor_pool) -> None:
        self.reactor = reactor
        self.in_thread = in_thread  # where the spool's disk work runs
        self.spool = spool
        self.interval = interval
        self.seal_after = seal_after
        self.sender: Sender | None = None
        self.shipped_records = 0
        self.last_error: str | None = None
        self._call = None
        self._running: defer.Deferred | None = None
        self._last_backlog = -1
        self._unchanged_since = 0.0
        self._stopping = False
        # The node's SpoolWriter, when records are written per reactor turn (see
        # accesslog.spoolwriter): then the shipper leaves writing and fsync to it and only seals.
        self.writer = None
        # More spools shipped as the same stream after this one: on a node with workers, each
        # worker's (workers/spools.py SlotSource: sealed_segments, read_batches, acknowledge).
        self.sources: list = []
        # Limits of one batch (`read_batches` keywords). A slave's batches cross the control plane
        # and keep the spool's defaults; a standalone node stores its own in bigger ones (fewer
        # commits and thread round trips per record: assembly/standalone.py).
        self.batch_limits: dict[str, int] = {}

    def set_sender(self, sender: Sender | None) -> None:
        """Where batches go now (None while the master is away: records wait in the spool)."""
        self.sender = sender
        if sender is not None:
            self._kick()

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._schedule()

    def _schedule(self) -> None:
        if not self._stopping:
            self._call = self.reactor.callLater(self.interval, self._kick)

    def _kick(self) -> None:
        if self._running is not None:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._running = defer.ensureDeferred(self._tick())
        self._running.addErrback(self._failed)
        self._running.addBoth(self._done)

    def _failed(self, reason) -> None:
        message = reason.getErrorMessage()
        if message != self.last_error:
            log.warn("shipping access records paused: {why}", why=message)
        self.last_error = message

    def _done(self, _ignored) -> None:
        self._running = None
        self._schedule()

    async def _tick(self) -> None:
        spool = self.spool
        now = self.reactor.seconds()
        backlog = spool.backlog_records
        if backlog != self._last_backlog:
            self._last_backlog = backlog
            self._unchanged_since = now
        sealed = spool.sealed_segments()
        writer = self.writer
        if writer is None and spool.flush_due():
            await self.in_thread(spool.flush)
        # Seal the open segment once records have stopped arriving for a moment, or when
        # shipping is possible and nothing sealed waits: records should not linger unshipped.
        if backlog and (now - self._unchanged_since >= self.seal_after or (self.sender and not sealed)):
            if writer is None:
                await self.in_thread(spool.seal)
            elif writer.writable:
                spool.request_seal()  # a rename, done by the writer on this (reactor) thread
                writer.write_now()
        if self.sender is None:
            return
        for source in [spool, *self.sources]:
            if not await self._ship_source(source):
                return

    async def _ship_source(self, source) -> bool:
        """Ship `source`'s sealed segments in order; False when the link went away meanwhile."""
        for segment in await self.in_thread(source.sealed_segments):
            batches = await self.in_thread(lambda: list(source.read_batches(segment, **self.batch_limits)))
            for batch in batches:
                sender = self.sender
                if sender is None:
                    return False
                await sender(batch)
                self.shipped_records += len(batch.records)
            await self.in_thread(source.acknowledge, segment)
            if self.last_error is not None:
                log.info("shipping access records resumed")
                self.last_error = None
        return True

    async def _drain(self) -> None:
        self._stopping = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self._running is not None:
            await self._running
        await self.in_thread(self.spool.close)

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._drain())
