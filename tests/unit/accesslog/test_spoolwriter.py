"""SpoolWriter: records reach the segment file in the reactor turn they were appended in; fsync on
the group-commit timer; an unwritable spool holds records in memory up to a bound, counts drops,
and writes the backlog in pieces once the disk takes writes again. Driven by a `task.Clock`."""

from __future__ import annotations

import errno
import json
import os

import pytest
from twisted.internet.task import Clock

from safesquid_tw.util.threads import inline
from safesquid_tw.accesslog import spool as spool_module
from safesquid_tw.accesslog.spoolwriter import SpoolWriter
from safesquid_tw.accesslog.segment import scan_segment
from safesquid_tw.accesslog.spool import Spool


def record(i: int, pad: int = 0) -> bytes:
    return json.dumps({"ts": 1795300000.0 + i, "url": f"http://h{i}.test/", "pad": "x" * pad}).encode()


def on_disk(spool: Spool) -> list[bytes]:
    out = []
    for path in sorted(spool.directory.iterdir()):
        if path.name.endswith((".open", ".seg")):
            out += [payload for _seq, payload in scan_segment(path.read_bytes()).records]
    return out


class Disk:
    """Makes the spool's write(2) and open(2) fail while `broken` is set (ENOSPC)."""

    def __init__(self, monkeypatch) -> None:
        self.broken = False
        real_write, real_open = os.write, os.open

        def write(fd, data):
            if self.broken:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.writes.append(len(data))
            return real_write(fd, data)

        def open_(path, flags, mode=0o777):
            if self.broken and flags & os.O_CREAT:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_open(path, flags, mode)

        self.writes: list[int] = []
        monkeypatch.setattr(spool_module.os, "write", write)
        monkeypatch.setattr(spool_module.os, "open", open_)


def make(tmp_path, clock, **kwargs):
    spool = Spool(tmp_path / "spool", node="n1", segment_bytes=1 << 20, cap_bytes=64 << 20)
    writer = SpoolWriter(clock, spool, wall_clock=clock.seconds, in_thread=inline, **kwargs)
    writer.startService()
    return spool, writer


def test_records_of_a_turn_are_written_at_the_end_of_the_turn_without_fsync(tmp_path, monkeypatch):
    clock = Clock()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    spool, writer = make(tmp_path, clock, fsync_interval=1.0)
    del synced[:]  # the spool's state, written at start
    for i in range(3):
        writer.append(record(i))
    assert on_disk(spool) == []  # still this turn
    clock.advance(0)  # the reactor's next turn begins: callLater(0) runs before any I/O wait
    assert on_disk(spool) == [record(i) for i in range(3)]
    assert synced == []
    clock.advance(1.0)  # the group-commit timer
    assert synced
    assert writer.stats()["memory_bytes"] == 0


def test_write_due_writes_the_turns_records_at_once_and_only_once(tmp_path):
    """Before a response leaves straight for the client socket, its record is written."""
    clock = Clock()
    spool, writer = make(tmp_path, clock)
    writer.write_due()  # nothing pending: nothing happens
    writer.append(record(0))
    writer.append(record(1))
    writer.write_due()
    assert on_disk(spool) == [record(0), record(1)]
    assert not clock.getDelayedCalls() or all(c.getTime() > 0 for c in clock.getDelayedCalls())
    clock.advance(0)
    assert on_disk(spool) == [record(0), record(1)]  # not twice


def test_after_records_sends_once_the_turns_records_are_written(tmp_path, monkeypatch):
    clock = Clock()
    disk = Disk(monkeypatch)
    spool, writer = make(tmp_path, clock)
    sent = []
    writer.after_records(lambda: sent.append(len(on_disk(spool))))
    assert sent == [0]  # nothing waits to be written: at once
    writer.append(record(0))
    writer.append(record(1))
    writer.after_records(lambda: sent.append(len(on_disk(spool))))
    writer.after_records(lambda: sent.append(len(on_disk(spool))))
    assert sent == [0]
    writes = len(disk.writes)
    clock.advance(0)  # the turn's write, then the held sends
    assert sent == [0, 2, 2]
    assert len(disk.writes) == writes + 1  # one write(2) for the turn
    disk.broken = True
    writer.append(record(2))
    clock.advance(0)
    assert not writer.writable
    writer.after_records(lambda: sent.append("now"))
    assert sent[-1] == "now"  # the records wait in memory; responses do not


def test_write_due_leaves_a_backlog_to_its_own_pace(tmp_path, monkeypatch):
    clock = Clock()
    disk = Disk(monkeypatch)
    spool, writer = make(tmp_path, clock)
    disk.broken = True
    writer.append(record(0))
    clock.advance(0)
    assert not writer.writable
    writer.write_due()  # the retry timer decides, not every response
    assert on_disk(spool) == []
    disk.broken = False
    clock.advance(writer.retry_interval)
    assert on_disk(spool) == [record(0)]


def test_unwritable_spool_holds_records_in_memory_then_drops_and_counts(tmp_path, monkeypatch):
    clock = Clock()
    disk = Disk(monkeypatch)
    line = record(0, pad=100)
    spool, writer = make(tmp_path, clock, memory_bytes=len(line) * 20, piece_bytes=len(line) * 3)
    disk.broken = True
    for i in range(30):
        writer.append(record(i, pad=100))
        clock.advance(0)
    stats = writer.stats()
    assert stats["writable"] is False and "No space left" in stats["reason"]
    assert 15 <= stats["memory_records"] <= 20
    assert stats["dropped_records"] == 30 - stats["memory_records"]
    held = stats["memory_records"]
    disk.broken = False
    clock.advance(1.0)  # the retry timer, then one reactor turn per piece
    assert writer.writable and writer.reason is None
    assert spool.pending_records == 0
    assert len(on_disk(spool)) == held
    # The backlog went out a piece per reactor turn, not in one write.
    assert max(disk.writes) <= len(line) * 4
    assert len(disk.writes) >= held // 4
    clock.advance(1.0)  # the dropped count is persisted with the next sync
    reopened = Spool(tmp_path / "spool", node="n1", segment_bytes=1 << 20, cap_bytes=64 << 20)
    assert reopened.dropped_records == 30 - held


def test_shipper_seals_through_the_writer(tmp_path):
    from safesquid_tw.cluster.shipper import LogShipper

    clock = Clock()
    spool, writer = make(tmp_path, clock)
    shipper = LogShipper(clock, spool, interval=0.5, seal_after=1.0, in_thread=inline)
    shipper.writer = writer
    shipper.startService()
    for i in range(5):
        writer.append(record(i))
    clock.advance(0)
    for _ in range(6):
        clock.advance(0.5)
    assert len(spool.sealed_segments()) == 1
    assert spool.backlog_records == 5


def test_a_segment_sealed_before_its_fsync_is_fsynced_by_name_even_after_a_failed_rename(tmp_path, monkeypatch):
    clock = Clock()
    spool, writer = make(tmp_path, clock)
    writer.append(record(1))
    clock.advance(0)
    real_replace = os.replace
    failures = []

    def failing_replace(src, dst):
        if str(dst).endswith(".seg") and not failures:
            failures.append(dst)
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(spool_module.os, "replace", failing_replace)
    spool.request_seal()
    writer.write_now()
    assert not writer.writable and failures
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                             real_fsync(fd)))
    clock.advance(1.0)  # the retry performs the seal; the group commit fsyncs the file by name
    clock.advance(1.0)
    assert writer.writable and len(spool.sealed_segments()) == 1
    [segment] = spool.sealed_segments()
    assert any(f"{segment:020d}." in path for path in synced), synced  # its data (same inode either name)
    assert str(spool.directory) in synced  # and the rename


def test_a_failing_fsync_is_logged_once_per_problem_not_once_per_temporary_file(tmp_path, monkeypatch):
    from twisted.logger import globalLogPublisher

    clock = Clock()
    spool, writer = make(tmp_path, clock)
    names = iter(range(1000))

    def failing_sync():
        raise OSError(errno.EPERM, "Operation not permitted", f"spool/.spool-state.json.{next(names)}.tmp")

    monkeypatch.setattr(spool, "sync", failing_sync)
    told: list[str] = []
    observer = lambda event: told.append(event.get("log_format", "")) if "fsync failed" in event.get("log_format", "") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(5):
            writer.sync()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert writer.sync_failures == 5
    assert len(told) == 1
