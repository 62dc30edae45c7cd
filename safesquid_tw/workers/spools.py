"""Each worker's own durable spool, and the node shipping all of them as its one stream.

Why per worker: a record must reach write(2) in the reactor turn its request finished in, in the
process that served it. Sending it to the node first would leave it in a pipe (or the node's
memory) where a SIGKILL of the node loses it. So every worker slot has a spool directory of its
own (`spool-workers/<slot>/`, the same segment format, writer and group commit as one process's
`spool/`), written only by the worker in that slot (a lock file says so, across restarts).

The node reads the *sealed* segments of every slot (never an `.open` one: that is the worker's)
and ships them through its one shipper, as the node's one stream: same node name, and segment
ids made unique across slots by `shipped_segment` (local id * SLOT_STRIDE + slot). Local ids come
from the wall clock in milliseconds (accesslog/spool.py), so shipped ids are far above any id the
node's own `spool/` hands out, and never repeat. Once the store acknowledged a whole segment, the
node asks the worker to delete it (`{"t": "ack"}`), so the worker's spool stays the one owner of
its files and its backlog and cap accounting stay right. An acknowledgement lost with a worker
that died only means the segment ships again after the restart; the store ignores the names it
already has, so nothing is doubled.

A slot no worker serves any more (the node now runs fewer workers, or one process) is recovered
by the node itself (its open segment sealed) and shipped and deleted the same way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from twisted.logger import Logger

from safesquid_tw.accesslog.segment import fsync_directory, scan_segment
from safesquid_tw.accesslog.spool import Batch, Spool, batches_of

log = Logger()

SLOT_STRIDE = 1024  # above --workers' maximum (256): a shipped id names its slot


def slot_directory(state_root: Path, slot: int) -> Path:
    return Path(state_root) / "spool-workers" / str(slot)


def shipped_segment(local: int, slot: int) -> int:
    return local * SLOT_STRIDE + slot


def _open_for_lock(directory: Path) -> int:
    # The lock is taken on the slot directory itself: no file has to be created, so a worker
    # starts (and holds its records in memory) even while the directory cannot be written.
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)


def lock_slot(directory: Path, *, wait: float = 120.0, sleep=time.sleep) -> int:
    """Take the slot's lock (an open fd, held for the process's life). A worker of an earlier
    node that is still finishing its requests (its node was killed) holds it until it exits."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = _open_for_lock(directory)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                os.close(fd)
                raise
            sleep(0.1)


def slot_is_locked(directory: Path) -> bool:
    try:
        fd = _open_for_lock(directory)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class SlotSource:
    """One slot's sealed segments as the shipper sees them (disk work: call in a thread).

    `ask_delete(local_id)` tells the slot's worker to delete a shipped segment and returns True;
    it returns False when no worker owns the slot now, and the node deletes the file itself."""

    def __init__(self, directory: Path, slot: int, node: str,
                 ask_delete: Callable[[int], bool] | None = None) -> None:
        self.directory = Path(directory)
        self.slot = slot
        self.node = node
        self.ask_delete = ask_delete
        self._files: dict[int, Path] = {}  # shipped id -> sealed file
        self._asked: set[int] = set()  # shipped and acknowledged, the worker asked to delete it

    def forget_asked(self) -> None:
        """The slot's worker (re)started: anything it did not delete ships again (deduplicated)."""
        self._asked.clear()

    def sealed_segments(self) -> list[int]:
        files: dict[int, Path] = {}
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            names = []
        for name in names:
            parts = name.split(".")
            if len(parts) == 3 and parts[2] == "seg" and parts[0].isdigit() and parts[1].isdigit():
                files[shipped_segment(int(parts[0]), self.slot)] = self.directory / name
        self._asked &= set(files)
        self._files = files
        return sorted(s for s in files if s not in self._asked)

    def read_batches(self, segment: int, max_records: int = 500, max_bytes: int = 256 * 1024) -> Iterator[Batch]:
        path = self._files.get(segment)
        if path is None:
            return
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # deleted by the worker's spool cap meanwhile
            return
        scan = scan_segment(data)
        if scan.bad_lines:
            log.error("worker spool segment {name}: {bad} damaged lines skipped, {good} valid records ship",
                      name=path.name, bad=scan.bad_lines, good=len(scan.records))
        yield from batches_of(self.node, segment, scan.records, max_records, max_bytes)

    def acknowledge(self, segment: int) -> None:
        path = self._files.get(segment)
        if path is None:
            return
        local = segment // SLOT_STRIDE
        if self.ask_delete is not None and self.ask_delete(local):
            self._asked.add(segment)
            return
        path.unlink(missing_ok=True)
        self._files.pop(segment, None)
        fsync_directory(self.directory)


def recover_orphan_slot(directory: Path, node: str) -> bool:
    """A slot no worker of this node will serve: seal what its last worker left open (the
    node's Spool recovery does that), so the node can ship it. False if a process holds it."""
    if slot_is_locked(directory):
        return False
    Spool(directory, node=node).close()
    return True


def existing_slots(state_root: Path) -> list[int]:
    base = Path(state_root) / "spool-workers"
    try:
        return sorted(int(name) for name in os.listdir(base) if name.isdigit())
    except FileNotFoundError:
        return []


__all__ = ["SLOT_STRIDE", "SlotSource", "existing_slots", "lock_slot", "recover_orphan_slot",
           "shipped_segment", "slot_directory"]
