"""The on-disk format of the log spool's segments, and the file work that needs no spool state.

Every line is `<crc32 hex> <seq> <payload>\\n`, the CRC covering `<seq> <payload>`, so a torn
write or a flipped bit is found line by line. Files in the spool directory:

- `<segment>.open`: the segment being appended to (at most one);
- `<segment>.<records>.seg`: sealed, waiting to be shipped; the record count is in the name so
  the backlog is known at start-up without reading every segment;
- `<segment>[.<n>].corrupt`: a damaged segment set aside for inspection (its valid records were
  copied into a clean `.seg` of the same id and ship as usual).

Everything here is durable before it returns (data and directory entries are fsynced), because
the spool's exactly-once promise rests on what survives a crash.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import attrs

__all__ = [
    "SegmentScan", "cut_torn_tail", "encode_line", "fsync_directory", "open_path",
    "scan_segment", "sealed_path", "set_aside_files", "write_durably",
]


@attrs.frozen
class SegmentScan:
    records: list[tuple[int, bytes]]  # (seq, payload), in file order
    bad_lines: int
    valid_end: int  # offset just past the last valid line
    damaged_inside: bool  # a damaged line is followed by a valid one: not just a torn tail


def encode_line(seq: int, payload: bytes) -> bytes:
    body = b"%d %s" % (seq, payload)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_line(line: bytes) -> tuple[int, bytes] | None:
    if len(line) < 11 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        seq_text, payload = body.split(b" ", 1)
        return int(seq_text), payload
    except ValueError:
        return None


def scan_segment(data: bytes) -> SegmentScan:
    """Valid records of a segment file, and where and how it is damaged."""
    records: list[tuple[int, bytes]] = []
    bad = 0
    offset = valid_end = 0
    damaged_inside = False
    last_seq = -1
    lines = data.split(b"\n")
    # The element after the last newline is b"" for a complete file, else an unterminated tail.
    for index, line in enumerate(lines):
        end = offset + len(line) + 1
        terminated = index < len(lines) - 1
        decoded = _decode_line(line) if terminated else None
        if decoded is not None and decoded[0] > last_seq:
            if bad:
                damaged_inside = True
            records.append(decoded)
            last_seq = decoded[0]
            valid_end = end
        elif terminated or line:
            bad += 1
        offset = end
    return SegmentScan(records, bad, valid_end, damaged_inside)


def open_path(directory: Path, segment: int) -> Path:
    return directory / f"{segment:020d}.open"


def sealed_path(directory: Path, segment: int, records: int) -> Path:
    return directory / f"{segment:020d}.{records}.seg"


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def set_aside_files(directory: Path, segment: int, path: Path, scan: SegmentScan) -> tuple[Path, Path]:
    """Move the damaged file at `path` to a free `.corrupt` name and its valid records to a clean
    `.seg` (none when nothing is valid); returns (clean path, corrupt path).

    The clean copy is synced as `.seg.tmp` before the damaged file moves, so a crash in between
    leaves files that spool recovery can finish the job from.
    """
    clean_path = sealed_path(directory, segment, len(scan.records))
    tmp_path = clean_path.with_name(clean_path.name + ".tmp")
    write_durably(tmp_path, b"".join(encode_line(seq, p) for seq, p in scan.records))
    corrupt_path = directory / f"{segment:020d}.corrupt"
    n = 0
    while corrupt_path.exists():
        n += 1
        corrupt_path = directory / f"{segment:020d}.{n}.corrupt"
    os.replace(path, corrupt_path)
    os.replace(tmp_path, clean_path)
    if not scan.records:
        clean_path.unlink()
    fsync_directory(directory)
    return clean_path, corrupt_path


def cut_torn_tail(path: Path, valid_end: int) -> int:
    """Durably truncate `path` just past its last valid line; returns the bytes cut off."""
    with open(path, "r+b") as f:
        cut = f.seek(0, os.SEEK_END) - valid_end
        f.truncate(valid_end)
        f.flush()
        os.fsync(f.fileno())
    return cut
