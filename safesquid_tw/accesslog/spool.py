"""A slave's on-disk spool of access records waiting to be shipped to the master.

Records go into append-only *segments*, checksummed line by line; `segment` describes the line
format and the segment files. Beside them, `spool-state.json` holds the next segment id and the
count of records dropped by the size cap.

Exactly once, end to end: (node, segment, seq) names a record for ever. Sequence numbers restart
at 0 in every segment, and segment ids never repeat: the next id is persisted *before* a segment
file is created, and a spool without state (new, or its state lost) starts from the wall clock in
milliseconds, above any id an earlier spool of the same node could have used. The master ignores
a (node, segment, seq) it already has, so re-shipping after a crash is harmless; a segment is
deleted only once `acknowledge()` says the master stored all of it.

The size cap is the one deliberate loss: past `cap_bytes`, the oldest sealed segments are deleted
and their records added to `dropped_records`, which is persisted *before* the deletion (a crash in
between over-counts, never hides a loss). A segment dropped while it was being shipped may end up
both stored and counted as dropped; that errs on the side of telling.

Durability: `append()` only touches memory; `write_out()` hands the buffered lines to the kernel
(`write(2)`, no fsync) and is called by the node once per reactor turn (see `accesslog.spoolwriter`),
so a *process* crash loses no appended record. `sync()` fsyncs what was written (data, sealed
files, directory entries) and runs on a group-commit timer in a worker thread, so only a *machine*
crash can lose the records written since the last sync. Segment ids are reserved ahead in blocks
(`ID_RESERVE`) so that opening a segment on the reactor thread does not wait for an fsync.

Threads: `append()` only touches memory under a short lock, so it is safe on the reactor thread.
`write_out()`, `flush()`, `seal()`, `read_batches()`, `acknowledge()` and `close()` do disk I/O;
they are serialised by a second lock, which is never held across an fsync, so the reactor's
`write_out()` never waits for the disk to sync.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import attrs
from twisted.logger import Logger

from safesquid_tw.accesslog.segment import (
    SegmentScan, cut_torn_tail, encode_line, fsync_directory, open_path, scan_segment, sealed_path,
    set_aside_files,
)
from safesquid_tw.util.atomic import atomic_write

_log = Logger()

STATE_FILE = "spool-state.json"
STATE_FORMAT = "safesquid-spool-state/1"
# Far below Perspective Broker's 640 KiB string limit, so one record always fits in a message.
MAX_RECORD_BYTES = 256 * 1024
_PROBLEMS_KEPT = 100
# Segment ids persisted ahead of use: opening a segment rarely needs a state write (and fsync).
ID_RESERVE = 64


@attrs.frozen
class Batch:
    """Consecutive records of one segment: record i has sequence number `first_seq + i`."""

    node: str
    segment: int
    first_seq: int
    records: list[bytes]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records) - 1


@attrs.frozen
class SpoolProblem:
    """Something the spool had to repair or give up; logged, and kept for the status pages."""

    kind: str  # "torn-tail", "corrupt-segment", "corrupt-state", "dropped", "unwritable"
    segment: int | None
    detail: str


@attrs.frozen
class _Sealed:
    path: Path
    records: int
    size: int


@attrs.define
class _Pending:
    """Lines of one segment appended since the last flush; `seal_count` set once sealed."""

    segment: int
    lines: list[bytes] = attrs.Factory(list)
    seal_count: int | None = None


class Spool:
    """Append-only, size-capped, crash-safe queue of access records (one JSON line each)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        node: str,
        segment_bytes: int = 4 << 20,
        cap_bytes: int = 512 << 20,
        fsync_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if segment_bytes <= 0 or cap_bytes < segment_bytes:
            raise ValueError("spool needs segment_bytes > 0 and cap_bytes >= segment_bytes")
        self.directory = Path(directory)
        self.node = node
        self.segment_bytes = segment_bytes
        self.cap_bytes = cap_bytes
        self.fsync_interval = fsync_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()  # in-memory state; never held across disk I/O
        self._disk_lock = threading.RLock()  # one thread at a time writes, renames or deletes
        self._pending: list[_Pending] = []
        self._pending_bytes = 0  # encoded bytes appended and not yet written: the memory backlog
        self._fd_dirty = False  # the open segment has writes not yet fsynced
        self._unsynced: set[int] = set()  # segments closed before their data was fsynced
        self._dir_dirty = False  # directory entries (create, rename, unlink) not yet fsynced
        self._state_dirty = False  # counters changed in memory, state file not yet rewritten
        self._oldest_buffered_at: float | None = None
        self._open_id: int | None = None
        self._open_seq = 0
        self._open_size = 0  # written + buffered bytes of the open segment: decides the seal
        self._unsealed_records = 0  # appended, not yet in a sealed file (open or sealing)
        self._unsealed_bytes = 0
        self._open_on_disk = 0  # bytes of the open segment file; disk side only
        self._open_fd: int | None = None
        self._sealed: dict[int, _Sealed] = {}
        self._sealed_records = 0
        self._sealed_bytes = 0
        self.problems: collections.deque[SpoolProblem] = collections.deque(maxlen=_PROBLEMS_KEPT)
        self.dropped_records = 0
        self._persisted_next = 0
        self._next_segment = 0
        self._directory_missing = False
        with self._disk_lock:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                # Nothing to recover; the first segment creates the directory once it can.
                self._directory_missing = True
                self._next_segment = int(self._wall_clock() * 1000)
                self._report("unwritable", None, f"cannot create the spool directory: {e}")
            else:
                self._recover()

    # -- reactor-side API (memory only) -------------------------------------------------------

    def append(self, line: bytes) -> tuple[int, int]:
        """Queue one record (a JSON line; one trailing newline is allowed) and name it."""
        if line.endswith(b"\n"):
            line = line[:-1]
        if b"\n" in line:
            raise ValueError("a spooled record must be a single line")
        if len(line) > MAX_RECORD_BYTES:
            raise ValueError(f"a spooled record must be at most {MAX_RECORD_BYTES} bytes")
        with self._lock:
            if self._open_id is None:
                self._open_id = self._next_segment
                self._next_segment += 1
                self._open_seq = self._open_size = 0
            segment, seq = self._open_id, self._open_seq
            encoded = encode_line(seq, line)
            if not self._pending or self._pending[-1].segment != segment:
                self._pending.append(_Pending(segment))
            self._pending[-1].lines.append(encoded)
            self._pending_bytes += len(encoded)
            self._open_seq += 1
            self._open_size += len(encoded)
            self._unsealed_records += 1
            self._unsealed_bytes += len(encoded)
            if self._oldest_buffered_at is None:
                self._oldest_buffered_at = self._clock()
            if self._open_size >= self.segment_bytes:
                self._seal_locked()
        return segment, seq

    def flush_due(self) -> bool:
        """True when buffered records are `fsync_interval` old, or a sealed segment waits."""
        with self._lock:
            if any(pending.seal_count is not None for pending in self._pending):
                return True  # a whole segment is ready to ship as soon as it is on disk
            return (
                self._oldest_buffered_at is not None
                and self._clock() - self._oldest_buffered_at >= self.fsync_interval
            )

    @property
    def backlog_records(self) -> int:
        with self._lock:
            return self._sealed_records + self._unsealed_records

    @property
    def backlog_bytes(self) -> int:
        with self._lock:
            return self._sealed_bytes + self._unsealed_bytes

    @property
    def pending_bytes(self) -> int:
        """Bytes appended but not yet written to a segment file (held in memory)."""
        return self._pending_bytes

    @property
    def pending_records(self) -> int:
        with self._lock:
            return sum(len(p.lines) for p in self._pending)

    def request_seal(self) -> None:
        """Close the open segment at the next `write_out()` (memory only)."""
        with self._lock:
            self._seal_locked()

    def count_dropped(self, records: int) -> None:
        """Records lost before they reached the spool (memory bound): counted with the cap's
        drops, persisted at the next `sync()`."""
        with self._lock:
            self.dropped_records += records
            self._state_dirty = True

    def sealed_segments(self) -> list[int]:
        """Segments ready to ship, oldest first."""
        with self._lock:
            return sorted(self._sealed)

    def corrupt_files(self) -> list[Path]:
        """Damaged files set aside for inspection."""
        return sorted(self.directory.glob("*.corrupt"))

    # -- disk side (may run in a worker thread) -----------------------------------------------

    def write_out(self, max_bytes: int | None = None) -> int:
        """Hand buffered lines to the kernel (`write(2)`, no fsync) and perform pending seals
        (renames); at most about `max_bytes` (at least one line) when given. Returns the bytes
        written. On OSError nothing is lost: unwritten lines stay buffered, in order."""
        written = 0
        with self._disk_lock:
            while max_bytes is None or written < max_bytes:
                with self._lock:
                    if not self._pending:
                        self._oldest_buffered_at = None
                        break
                    head = self._pending[0]
                    budget = None if max_bytes is None else max_bytes - written
                    count, size = _prefix(head.lines, budget)
                    whole = count == len(head.lines)
                    piece = _Pending(head.segment, head.lines[:count], head.seal_count if whole else None)
                sealed = False
                try:
                    self._write_pending(piece)
                    sealed = piece.seal_count is not None
                finally:
                    with self._lock:
                        if count and not piece.lines:  # written: `_write_pending` cleared them
                            del head.lines[:count]
                            self._pending_bytes -= size
                            written += size
                        if sealed:
                            head.seal_count = None
                        if not head.lines and head.seal_count is None and self._pending[:1] == [head]:
                            self._pending.pop(0)
        return written

    def sync(self) -> None:
        """fsync what `write_out()` wrote: the open segment, sealed files, the directory, the
        state file when counters changed; then enforce the size cap. For a worker thread."""
        with self._disk_lock:
            fd = os.dup(self._open_fd) if self._open_fd is not None and self._fd_dirty else None
            self._fd_dirty = False
            segments, self._unsynced = self._unsynced, set()
            with self._lock:
                paths = [self._sealed[s].path if s in self._sealed else self._open_path(s) for s in segments]
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            reserve = self._next_segment + ID_RESERVE // 2 > self._persisted_next
        try:
            if fd is not None:
                os.fsync(fd)
            for path in paths:
                try:
                    sync_fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:  # shipped and deleted already, or renamed meanwhile
                    continue
                try:
                    os.fsync(sync_fd)
                finally:
                    os.close(sync_fd)
            if dir_dirty:
                fsync_directory(self.directory)
        except BaseException:
            with self._disk_lock:
                self._fd_dirty = self._fd_dirty or fd is not None
                self._unsynced |= segments
                self._dir_dirty = self._dir_dirty or dir_dirty
            raise
        finally:
            if fd is not None:
                os.close(fd)
        with self._disk_lock:
            if reserve or self._state_dirty:
                if reserve:
                    self._persisted_next = max(self._persisted_next, self._next_segment + ID_RESERVE)
                self._state_dirty = False
                try:
                    self._save_state()
                except BaseException:
                    self._state_dirty = True
                    raise
            self._enforce_cap()

    def flush(self) -> None:
        """Write and fsync every buffered line; perform pending seals; enforce the size cap."""
        self.write_out()
        self.sync()

    def seal(self) -> None:
        """Close the open segment even if small, so its records can ship; flushes."""
        with self._lock:
            self._seal_locked()
        self.flush()

    def close(self) -> None:
        """Seal and flush everything; the spool can be reopened later on the same directory."""
        self.seal()
        with self._disk_lock:
            self._close_open_fd()

    def read_batches(
        self, segment: int, max_records: int = 500, max_bytes: int = 256 * 1024
    ) -> Iterator[Batch]:
        """Batches of a sealed segment, in order, each of at most `max_records` records and
        `max_bytes` payload bytes (a single larger record travels alone).

        A damaged segment is set aside as `.corrupt` and reported; its valid records still ship.
        A batch never spans a gap in sequence numbers, so `first_seq + i` is always right.
        The segment is read (disk I/O) at the first `next()`: iterate in a worker thread.
        """
        yield from batches_of(self.node, segment, self._read_sealed(segment), max_records, max_bytes)

    def acknowledge(self, segment: int) -> None:
        """The master stored the whole segment: delete it durably (unknown ids are ignored)."""
        with self._disk_lock:
            with self._lock:
                sealed = self._forget_sealed(segment)
            if sealed is None:
                return
            sealed.path.unlink(missing_ok=True)
        fsync_directory(self.directory)  # outside the lock: the reactor's writes never wait on it

    # -- internals ----------------------------------------------------------------------------

    def _seal_locked(self) -> None:
        if self._open_id is None:
            return
        if not self._pending or self._pending[-1].segment != self._open_id:
            self._pending.append(_Pending(self._open_id))
        self._pending[-1].seal_count = self._open_seq
        self._open_id = None

    def _forget_sealed(self, segment: int) -> _Sealed | None:
        sealed = self._sealed.pop(segment, None)
        if sealed is not None:
            self._sealed_records -= sealed.records
            self._sealed_bytes -= sealed.size
        return sealed

    def _remember_sealed(self, segment: int, sealed: _Sealed) -> None:
        self._forget_sealed(segment)
        self._sealed[segment] = sealed
        self._sealed_records += sealed.records
        self._sealed_bytes += sealed.size

    def _open_path(self, segment: int) -> Path:
        return open_path(self.directory, segment)

    def _sealed_path(self, segment: int, records: int) -> Path:
        return sealed_path(self.directory, segment, records)

    def _write_pending(self, pending: _Pending) -> None:
        path = self._open_path(pending.segment)
        if self._open_fd is None:
            if self._directory_missing:  # it could not be created at start
                self.directory.mkdir(parents=True, exist_ok=True)
                self._directory_missing = False
            if pending.segment >= self._persisted_next:
                # The id is on disk before any file carries it: it can never be handed out again.
                # Reserved in blocks, so this fsync is rare (see `sync()`).
                self._persisted_next = pending.segment + ID_RESERVE
                try:
                    self._save_state()
                except BaseException:
                    self._persisted_next = pending.segment
                    raise
            self._open_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._open_on_disk = os.fstat(self._open_fd).st_size
            self._dir_dirty = True
        if pending.lines:
            data = b"".join(pending.lines)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._open_fd, view) :]
            except OSError:
                # Cut a partial write off so the retry does not leave a damaged line behind.
                os.ftruncate(self._open_fd, self._open_on_disk)
                raise
            self._open_on_disk += len(data)
            self._fd_dirty = True
            pending.lines = []  # written: a retry after a failed seal must not write them twice
        if pending.seal_count is not None:
            if self._fd_dirty:
                # Closed before its fsync: `sync()` opens it again by name (sealed or not yet).
                self._unsynced.add(pending.segment)
            self._close_open_fd()
            if pending.seal_count == 0:
                path.unlink(missing_ok=True)
                self._unsynced.discard(pending.segment)
                return
            sealed_path = self._sealed_path(pending.segment, pending.seal_count)
            os.replace(path, sealed_path)
            self._dir_dirty = True
            with self._lock:
                self._remember_sealed(
                    pending.segment, _Sealed(sealed_path, pending.seal_count, self._open_on_disk)
                )
                self._unsealed_records -= pending.seal_count
                self._unsealed_bytes -= self._open_on_disk

    def _close_open_fd(self) -> None:
        if self._open_fd is not None:
            os.close(self._open_fd)
            self._open_fd = None
            self._fd_dirty = False  # the caller keeps the segment in `_unsynced` if it was dirty

    def _enforce_cap(self) -> None:
        while True:
            with self._lock:
                open_bytes = self._open_on_disk if self._open_fd is not None else 0
                if not self._sealed or self._sealed_bytes + open_bytes <= self.cap_bytes:
                    return
                oldest = min(self._sealed)
                victim = self._sealed[oldest]
            # Count first, delete second: a crash in between over-counts, never loses silently.
            self.dropped_records += victim.records
            self._save_state()
            victim.path.unlink(missing_ok=True)
            fsync_directory(self.directory)
            with self._lock:
                self._forget_sealed(oldest)
            self._report(
                "dropped",
                oldest,
                f"spool over its cap of {self.cap_bytes} bytes: dropped {victim.records} records "
                f"(total dropped {self.dropped_records})",
            )

    def _read_sealed(self, segment: int) -> list[tuple[int, bytes]]:
        with self._disk_lock:
            with self._lock:
                sealed = self._sealed.get(segment)
            if sealed is None:
                return []
            try:
                data = sealed.path.read_bytes()
            except FileNotFoundError:
                return []
            scan = scan_segment(data)
            if scan.bad_lines:
                self._set_aside(segment, sealed.path, scan)
            return scan.records

    def _set_aside(self, segment: int, path: Path, scan: SegmentScan) -> None:
        """Keep the damaged file as `.corrupt`; its valid records go on in a clean segment."""
        clean_path, corrupt_path = set_aside_files(self.directory, segment, path, scan)
        clean = _Sealed(clean_path, len(scan.records), clean_path.stat().st_size if scan.records else 0)
        with self._lock:
            self._forget_sealed(segment)
            if scan.records:
                self._remember_sealed(segment, clean)
        self._report(
            "corrupt-segment",
            segment,
            f"{scan.bad_lines} damaged lines; set aside as {corrupt_path.name}, "
            f"{len(scan.records)} valid records kept",
        )

    def _recover(self) -> None:
        self._load_state()
        highest = -1
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.startswith(f".{STATE_FILE}.") and name.endswith(".tmp"):
                try:
                    path.unlink()  # an interrupted state write; the old state is intact
                except OSError:
                    pass  # harmless; removed at a start that can write
                continue
            head = name.split(".", 1)[0]
            if not head.isdigit():
                continue
            segment = int(head)
            highest = max(highest, segment)
            if name.endswith((".seg.tmp", ".open")):
                # Finishing an interrupted write renames or cuts files. Where the directory cannot
                # be written now, the file stays as it is (its id stays taken) for a start that can.
                try:
                    if name.endswith(".seg.tmp"):
                        self._recover_set_aside(segment, path)
                    else:
                        self._recover_open(segment, path)
                except OSError as e:
                    self._report("unwritable", segment, f"cannot recover {name} now: {e}")
            elif name.endswith(".seg"):
                parts = name.split(".")
                if len(parts) == 3 and parts[1].isdigit():
                    self._remember_sealed(segment, _Sealed(path, int(parts[1]), path.stat().st_size))
        self._next_segment = max(self._persisted_next, highest + 1)
        # Reserve ids now (at start, before any traffic), so the first segments need no fsync.
        # If the directory cannot be written now, the first segment tries again (and the node's
        # writer holds records in memory meanwhile).
        reserved, self._persisted_next = self._persisted_next, self._next_segment + ID_RESERVE
        try:
            self._save_state()
        except OSError as e:
            self._persisted_next = reserved
            self._report("unwritable", None, f"cannot write the spool state: {e}")

    def _recover_set_aside(self, segment: int, tmp_path: Path) -> None:
        # An interrupted `_set_aside`: the clean copy was synced before the damaged file moved.
        original_gone = not list(self.directory.glob(f"{segment:020d}.*.seg"))
        if original_gone and list(self.directory.glob(f"{segment:020d}*.corrupt")):
            clean_path = tmp_path.with_name(tmp_path.name[: -len(".tmp")])
            os.replace(tmp_path, clean_path)
            records = int(clean_path.name.split(".")[1])
            self._remember_sealed(segment, _Sealed(clean_path, records, clean_path.stat().st_size))
        else:
            tmp_path.unlink()

    def _recover_open(self, segment: int, path: Path) -> None:
        """A segment open at a crash: cut a torn tail off, set damage aside, then seal it."""
        scan = scan_segment(path.read_bytes())
        if scan.damaged_inside:
            self._set_aside(segment, path, scan)
            return
        if scan.bad_lines:
            cut = cut_torn_tail(path, scan.valid_end)
            self._report("torn-tail", segment, f"cut {cut} bytes of an interrupted write")
        if not scan.records:
            path.unlink()
            return
        sealed_path = self._sealed_path(segment, len(scan.records))
        os.replace(path, sealed_path)
        fsync_directory(self.directory)
        self._remember_sealed(segment, _Sealed(sealed_path, len(scan.records), scan.valid_end))

    def _load_state(self) -> None:
        path = self.directory / STATE_FILE
        try:
            state = json.loads(path.read_bytes())
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown format {state.get('format')!r}")
            self._persisted_next = int(state["next_segment"])
            self.dropped_records = int(state["dropped_records"])
            return
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            aside = path.with_name(f"{STATE_FILE}.{int(self._wall_clock())}.corrupt")
            try:
                os.replace(path, aside)
            except OSError as unwritable:
                self._report("corrupt-state", None, f"unreadable spool state ({e}); not set aside: {unwritable}")
            else:
                self._report("corrupt-state", None, f"unreadable spool state ({e}); set aside as {aside.name}")
        # New or lost state: ids from the wall clock are above anything this node used before.
        # `_recover` writes the state once it has seen the segments on disk.
        self._persisted_next = int(self._wall_clock() * 1000)

    def _save_state(self) -> None:
        state = {
            "format": STATE_FORMAT,
            "next_segment": self._persisted_next,
            "dropped_records": self.dropped_records,
        }
        atomic_write(self.directory / STATE_FILE, json.dumps(state).encode("ascii"), mode=0o640)

    def _report(self, kind: str, segment: int | None, detail: str) -> None:
        self.problems.append(SpoolProblem(kind, segment, detail))
        _log.warn(
            "log spool {kind} (segment {segment}): {detail}", kind=kind, segment=segment, detail=detail
        )


def batches_of(node: str, segment: int, records, max_records: int, max_bytes: int) -> Iterator[Batch]:
    """A segment's (seq, payload) records as shipping batches: runs of consecutive sequence
    numbers, each of at most `max_records` records and about `max_bytes` bytes."""
    batch: list[bytes] = []
    first_seq = expected = -1
    size = 0
    for seq, payload in records:
        if batch and (seq != expected or len(batch) >= max_records or size + len(payload) > max_bytes):
            yield Batch(node, segment, first_seq, batch)
            batch, size = [], 0
        if not batch:
            first_seq = seq
        batch.append(payload)
        size += len(payload)
        expected = seq + 1
    if batch:
        yield Batch(node, segment, first_seq, batch)


def _prefix(lines: list[bytes], budget: int | None) -> tuple[int, int]:
    """How many leading lines fit in `budget` bytes (at least one), and their size."""
    if budget is None:
        return len(lines), sum(len(line) for line in lines)
    count = size = 0
    for line in lines:
        if count and size + len(line) > budget:
            break
        count += 1
        size += len(line)
    return count, size


__all__ = ["MAX_RECORD_BYTES", "Batch", "Spool", "SpoolProblem", "encode_line", "scan_segment"]
