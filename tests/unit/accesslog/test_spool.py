"""The slave's log spool: durable segments, restart safety, damage found and set aside, the cap."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from safesquid_tw.accesslog import spool as spool_module
from safesquid_tw.accesslog.spool import MAX_RECORD_BYTES, Spool, encode_line, scan_segment


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(i: int, pad: int = 0) -> bytes:
    return json.dumps({"ts": 1000.0 + i, "url": f"http://h{i}.test/", "pad": "x" * pad}).encode() + b"\n"


def make(tmp_path: Path, **kwargs) -> Spool:
    kwargs.setdefault("node", "node-a")
    kwargs.setdefault("wall_clock", lambda: 1000.0)
    return Spool(tmp_path / "spool", **kwargs)


def shipped(spool: Spool, **limits) -> list[tuple[int, int, bytes]]:
    """Every sealed record as (segment, seq, payload), acknowledging each segment."""
    out = []
    for segment in spool.sealed_segments():
        for batch in spool.read_batches(segment, **limits):
            out += [(batch.segment, batch.first_seq + i, r) for i, r in enumerate(batch.records)]
        spool.acknowledge(segment)
    return out


def open_files(spool: Spool) -> list[Path]:
    return sorted(spool.directory.glob("*.open"))


def test_round_trip_append_flush_seal_read_acknowledge(tmp_path: Path) -> None:
    spool = make(tmp_path)
    names = [spool.append(record(i)) for i in range(10)]
    assert [seq for _, seq in names] == list(range(10))
    assert len({segment for segment, _ in names}) == 1
    assert spool.backlog_records == 10
    assert spool.sealed_segments() == []  # nothing sealed yet
    spool.seal()
    segment = names[0][0]
    assert spool.sealed_segments() == [segment]
    batches = list(spool.read_batches(segment))
    assert [(b.node, b.segment, b.first_seq) for b in batches] == [("node-a", segment, 0)]
    assert batches[0].records == [record(i).rstrip(b"\n") for i in range(10)]
    spool.acknowledge(segment)
    assert spool.sealed_segments() == []
    assert spool.backlog_records == 0 and spool.backlog_bytes == 0
    assert list(spool.directory.glob("*.seg")) == []
    spool.acknowledge(segment)  # a repeated acknowledgement is harmless


def test_records_are_only_on_disk_after_flush(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append(record(1))
    assert open_files(spool) == []
    spool.flush()
    [path] = open_files(spool)
    assert scan_segment(path.read_bytes()).records == [(0, record(1).rstrip(b"\n"))]


def test_segment_sealed_when_it_reaches_segment_bytes(tmp_path: Path) -> None:
    line_size = len(encode_line(0, record(0).rstrip(b"\n")))
    spool = make(tmp_path, segment_bytes=line_size * 3, cap_bytes=1 << 20)
    names = [spool.append(record(i)) for i in range(7)]
    segments = sorted({s for s, _ in names})
    assert len(segments) == 3
    assert segments == list(range(segments[0], segments[0] + 3))  # consecutive, increasing
    spool.flush()
    assert spool.sealed_segments() == segments[:2]  # the third is still open
    assert [(s, q) for s, q, _ in shipped(spool)] == names[:6]


def test_flush_due_follows_the_clock_and_the_buffer_size(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = make(tmp_path, fsync_interval=1.0, clock=clock, segment_bytes=10_000, cap_bytes=1 << 20)
    assert not spool.flush_due()
    spool.append(record(1))
    assert not spool.flush_due()
    clock.now += 0.99
    assert not spool.flush_due()
    clock.now += 0.01
    assert spool.flush_due()
    spool.flush()
    assert not spool.flush_due()
    while spool.backlog_bytes < 10_000:  # a whole segment waiting is due at once
        spool.append(record(2))
    assert spool.flush_due()


def test_restart_after_crash_keeps_names_unique_and_segments_increasing(tmp_path: Path) -> None:
    first = make(tmp_path)
    before = [first.append(record(i)) for i in range(5)]
    first.flush()  # no seal, no close: the process dies here
    del first
    second = make(tmp_path)
    assert second.sealed_segments() == [before[0][0]]  # the open segment was recovered, sealed
    assert second.backlog_records == 5
    after = [second.append(record(i)) for i in range(5, 10)]
    assert after[0][0] > before[0][0]
    second.seal()
    names = [(s, q) for s, q, _ in shipped(second)]
    assert names == before + after
    assert len(set(names)) == 10


def test_segment_ids_never_repeat_even_once_everything_was_acknowledged(tmp_path: Path) -> None:
    first = make(tmp_path)
    old_segment, _ = first.append(record(0))
    first.seal()
    shipped(first)
    second = make(tmp_path)  # no segment file left: the persisted state carries the next id
    new_segment, seq = second.append(record(1))
    assert new_segment > old_segment and seq == 0


def test_lost_state_restarts_ids_from_the_wall_clock(tmp_path: Path) -> None:
    first = make(tmp_path, wall_clock=lambda: 1000.0)
    old_segment, _ = first.append(record(0))
    first.seal()
    shipped(first)
    (first.directory / spool_module.STATE_FILE).unlink()  # e.g. the state directory was wiped
    second = make(tmp_path, wall_clock=lambda: 2000.0)
    new_segment, _ = second.append(record(1))
    assert old_segment == 1_000_000
    assert new_segment == 2_000_000


def test_corrupt_state_is_set_aside_and_reported(tmp_path: Path) -> None:
    first = make(tmp_path)
    segment, _ = first.append(record(0))
    first.seal()
    (first.directory / spool_module.STATE_FILE).write_bytes(b"{not json")
    second = make(tmp_path, wall_clock=lambda: 500.0)  # a clock behind the files on disk
    assert [p.kind for p in second.problems] == ["corrupt-state"]
    assert list(second.directory.glob(f"{spool_module.STATE_FILE}.*.corrupt"))
    assert second.sealed_segments() == [segment]
    assert second.append(record(1))[0] > segment


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda line: line[: len(line) // 2], id="half-a-line"),
        pytest.param(lambda line: b"\0" * 40, id="zeros"),
        pytest.param(lambda line: line[:-2] + b"X\n", id="last-line-bad-crc"),
        pytest.param(lambda line: b"\n", id="empty-line"),
    ],
)
def test_torn_tail_is_cut_and_reported_complete_records_kept(tmp_path: Path, tail) -> None:
    spool = make(tmp_path)
    for i in range(3):
        spool.append(record(i))
    spool.flush()
    [path] = open_files(spool)
    good_size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(tail(encode_line(3, record(3).rstrip(b"\n"))))
    recovered = make(tmp_path)
    assert [p.kind for p in recovered.problems] == ["torn-tail"]
    [segment] = recovered.sealed_segments()
    [sealed] = recovered.directory.glob("*.seg")
    assert sealed.stat().st_size == good_size
    assert [q for _, q, _ in shipped(recovered)] == [0, 1, 2]
    assert not recovered.corrupt_files()


def damage_line(path: Path, index: int) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[index] = lines[index][:20] + b"#" + lines[index][21:]
    path.write_bytes(b"\n".join(lines))


def test_corrupt_sealed_segment_set_aside_and_its_valid_records_shipped(tmp_path: Path) -> None:
    spool = make(tmp_path)
    for i in range(6):
        spool.append(record(i))
    spool.seal()
    [segment] = spool.sealed_segments()
    [path] = spool.directory.glob("*.seg")
    original = path.read_bytes()
    damage_line(path, 2)
    damaged = path.read_bytes()
    batches = list(spool.read_batches(segment))
    # A batch never spans the hole, so first_seq + i still names every record.
    assert [(b.first_seq, len(b.records)) for b in batches] == [(0, 2), (3, 3)]
    assert [r for b in batches for r in b.records] == [
        line.split(b" ", 2)[2] for i, line in enumerate(original.split(b"\n")[:-1]) if i != 2
    ]
    [corrupt] = spool.corrupt_files()
    assert corrupt.read_bytes() == damaged  # kept as it was, for inspection
    assert [p.kind for p in spool.problems] == ["corrupt-segment"]
    assert spool.backlog_records == 5
    spool.acknowledge(segment)
    assert spool.corrupt_files() == [corrupt]  # acknowledging never deletes evidence
    assert spool.sealed_segments() == []


def test_set_aside_survives_a_restart(tmp_path: Path) -> None:
    spool = make(tmp_path)
    for i in range(4):
        spool.append(record(i))
    spool.seal()
    [segment] = spool.sealed_segments()
    [path] = spool.directory.glob("*.seg")
    damage_line(path, 0)
    list(spool.read_batches(segment))
    reopened = make(tmp_path)
    assert reopened.sealed_segments() == [segment]
    assert [q for _, q, _ in shipped(reopened)] == [1, 2, 3]
    assert len(reopened.corrupt_files()) == 1


def test_damage_inside_the_open_segment_at_restart_is_set_aside(tmp_path: Path) -> None:
    spool = make(tmp_path)
    for i in range(5):
        spool.append(record(i))
    spool.flush()
    [path] = open_files(spool)
    damage_line(path, 1)
    recovered = make(tmp_path)
    assert [p.kind for p in recovered.problems] == ["corrupt-segment"]
    assert len(recovered.corrupt_files()) == 1
    assert open_files(recovered) == []
    assert [q for _, q, _ in shipped(recovered)] == [0, 2, 3, 4]


def test_cap_drops_oldest_segments_and_counts_them_persistently(tmp_path: Path) -> None:
    line_size = len(encode_line(0, record(0).rstrip(b"\n")))
    spool = make(tmp_path, segment_bytes=line_size * 4, cap_bytes=line_size * 10)
    names = [spool.append(record(i)) for i in range(20)]  # 5 segments of 4 records
    spool.flush()
    segments = sorted({s for s, _ in names})
    # 5 sealed segments of 4 records: only 2 fit under the cap of 10 lines.
    assert spool.sealed_segments() == segments[-2:]
    assert spool.dropped_records == 12
    assert spool.backlog_bytes <= spool.cap_bytes
    assert [p.kind for p in spool.problems] == ["dropped"] * 3
    assert [q for s, q, _ in shipped(spool)] == [0, 1, 2, 3] * 2
    assert make(tmp_path).dropped_records == 12


def test_cap_counts_the_open_segment_on_disk(tmp_path: Path) -> None:
    line_size = len(encode_line(0, record(0).rstrip(b"\n")))
    spool = make(tmp_path, segment_bytes=line_size * 4, cap_bytes=line_size * 5)
    for i in range(6):  # one sealed segment of 4, two lines in the open one
        spool.append(record(i))
    spool.flush()
    assert spool.sealed_segments() == []
    assert spool.dropped_records == 4


@pytest.mark.parametrize(
    ("max_records", "max_bytes"),
    [(500, 256 * 1024), (7, 1 << 20), (1000, 1000), (3, 500), (1, 1)],
)
def test_batches_are_bounded_by_records_and_bytes(tmp_path: Path, max_records: int, max_bytes: int) -> None:
    spool = make(tmp_path, segment_bytes=1 << 22)
    expected = [record(i, pad=i % 97).rstrip(b"\n") for i in range(300)]
    for line in expected:
        spool.append(line)
    spool.seal()
    [segment] = spool.sealed_segments()
    batches = list(spool.read_batches(segment, max_records=max_records, max_bytes=max_bytes))
    seen = []
    for batch in batches:
        assert batch.first_seq == len(seen)
        assert 1 <= len(batch.records) <= max_records
        assert len(batch.records) == 1 or sum(map(len, batch.records)) <= max_bytes
        seen += batch.records
    assert seen == expected
    assert len(batches) > 1 or (max_records >= 300 and max_bytes > sum(map(len, expected)))


def test_a_record_larger_than_max_bytes_travels_alone(tmp_path: Path) -> None:
    spool = make(tmp_path)
    lines = [record(0), record(1, pad=5000), record(2)]
    for line in lines:
        spool.append(line)
    spool.seal()
    [segment] = spool.sealed_segments()
    sizes = [len(b.records) for b in spool.read_batches(segment, max_bytes=1000)]
    assert sizes == [1, 1, 1]


@pytest.mark.parametrize(
    "line",
    [b'{"a":1}\n{"b":2}', b"x" * (MAX_RECORD_BYTES + 1)],
    ids=["two-lines", "too-large"],
)
def test_append_refuses_what_cannot_be_one_record(tmp_path: Path, line: bytes) -> None:
    spool = make(tmp_path)
    with pytest.raises(ValueError):
        spool.append(line)
    assert spool.backlog_records == 0


def test_flush_in_another_thread_while_appending(tmp_path: Path) -> None:
    line_size = len(encode_line(0, record(0).rstrip(b"\n")))
    spool = make(tmp_path, segment_bytes=line_size * 50, cap_bytes=1 << 30)
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            spool.flush()

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        names = [spool.append(record(i)) for i in range(3000)]
    finally:
        stop.set()
        thread.join()
    spool.seal()
    assert spool.backlog_records == 3000
    out = shipped(spool)
    assert [(s, q) for s, q, _ in out] == names
    assert [r for _, _, r in out] == [record(i).rstrip(b"\n") for i in range(3000)]


def test_failed_write_is_retried_without_duplicates(tmp_path: Path, monkeypatch) -> None:
    spool = make(tmp_path)
    for i in range(3):
        spool.append(record(i))
    real_write = os.write
    calls = []

    def failing_write(fd: int, data) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            real_write(fd, bytes(data[:10]))  # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(spool_module.os, "write", failing_write)
    with pytest.raises(OSError):
        spool.flush()
    spool.append(record(3))
    spool.seal()
    monkeypatch.undo()
    assert [q for _, q, _ in shipped(spool)] == [0, 1, 2, 3]
    assert not spool.problems


def test_close_then_reopen_keeps_everything(tmp_path: Path) -> None:
    spool = make(tmp_path)
    names = [spool.append(record(i)) for i in range(3)]
    spool.close()
    reopened = make(tmp_path)
    assert [(s, q) for s, q, _ in shipped(reopened)] == names
    assert not reopened.problems


def test_failed_seal_is_retried_without_writing_lines_twice(tmp_path: Path, monkeypatch) -> None:
    spool = make(tmp_path)
    names = [spool.append(record(i)) for i in range(3)]
    real_replace = os.replace
    failures = []

    def failing_replace(src, dst) -> None:
        if str(dst).endswith(".seg") and not failures:
            failures.append(dst)
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(spool_module.os, "replace", failing_replace)
    with pytest.raises(OSError):
        spool.seal()
    assert spool.sealed_segments() == []
    spool.flush()  # the timer's next run finishes the seal
    monkeypatch.undo()
    assert [(s, q) for s, q, _ in shipped(spool)] == names
    assert not spool.problems


def _refuse_writes_under(directory: Path, monkeypatch) -> None:
    """Every create, rename or delete below `directory` fails as on a read-only file system."""
    real_open, real_replace, real_unlink = os.open, os.replace, Path.unlink
    denied = OSError(30, "Read-only file system")

    def below(path) -> bool:
        return str(path).startswith(str(directory))

    def refusing_open(path, flags, *args, **kwargs):
        if below(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied
        return real_open(path, flags, *args, **kwargs)

    def refusing_replace(src, dst) -> None:
        if below(src) or below(dst):
            raise denied
        real_replace(src, dst)

    def refusing_unlink(self, *args, **kwargs) -> None:
        if below(self):
            raise denied
        real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(spool_module.os, "replace", refusing_replace)
    monkeypatch.setattr(Path, "unlink", refusing_unlink)


def test_a_spool_opened_where_nothing_can_be_written_holds_records_until_it_can(tmp_path: Path, monkeypatch) -> None:
    """A worker or node starting while its state dir cannot be written (full disk, read-only,
    an immutable directory) keeps its records in memory instead of failing to start."""
    (tmp_path / "spool").mkdir()
    _refuse_writes_under(tmp_path / "spool", monkeypatch)
    spool = make(tmp_path)
    assert [p.kind for p in spool.problems] == ["unwritable"]
    names = [spool.append(record(i)) for i in range(3)]
    with pytest.raises(OSError):
        spool.flush()
    monkeypatch.undo()
    spool.seal()
    assert [(s, q) for s, q, _ in shipped(spool)] == names


def test_recovery_that_cannot_write_leaves_crashed_segments_for_the_next_start(tmp_path: Path, monkeypatch) -> None:
    spool = make(tmp_path)
    names = [spool.append(record(i)) for i in range(3)]
    spool.flush()  # on disk in an open segment, then the process dies
    _refuse_writes_under(tmp_path / "spool", monkeypatch)
    stuck = make(tmp_path, wall_clock=lambda: 2000.0)
    assert "unwritable" in [p.kind for p in stuck.problems]
    later = stuck.append(record(3))
    assert later[0] > names[0][0], "a new segment never reuses the id of one left on disk"
    monkeypatch.undo()
    recovered = make(tmp_path, wall_clock=lambda: 3000.0)
    assert [(s, q) for s, q, _ in shipped(recovered)] == names


def test_a_spool_whose_directory_cannot_be_created_creates_it_once_it_can(tmp_path: Path, monkeypatch) -> None:
    real_mkdir = Path.mkdir

    def refusing_mkdir(self, *args, **kwargs) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    spool = make(tmp_path)
    assert [p.kind for p in spool.problems] == ["unwritable"]
    names = [spool.append(record(i)) for i in range(2)]
    with pytest.raises(OSError):
        spool.flush()
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    spool.seal()
    assert [(s, q) for s, q, _ in shipped(spool)] == names
