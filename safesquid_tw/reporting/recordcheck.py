"""Bounds on what one access record may hold before the report store accepts it, and the
quarantine file where refused records are set aside.

A slave's record is trusted for its shape (`rows.record_row` checks types) but not for its
ranges: `bytes_out = 2**62` is a valid JSON integer that overflows the roll-up sums (SQLite's
64-bit integers), and a 200 KiB user name bloats every report page that shows it. `check_record`
refuses such a record with a `MalformedRecord` naming the field; the store then quarantines that
record alone and stores the rest of its batch.

`QuarantineFile` appends every quarantined record as one JSON line to
`<state-dir>/quarantine.jsonl` (mode 0600, rotated by size), so an administrator can read what
was set aside and why without opening the database; `count` is what /metrics reads.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from safesquid_tw.reporting.rows import MalformedRecord
from safesquid_tw.util.rotating import RotatingFile

log = Logger()

MAX_BYTES = 1 << 44  # 16 TiB in one transfer; 2**19 of these still sum within 63 bits
MAX_STATUS = 999
MAX_DURATION_MS = 30 * 86400 * 1000.0  # a month-long tunnel
MIN_TIME, MAX_TIME = 946684800.0, 7258118400.0  # 2000-01-01 .. 2200-01-01 UTC
MAX_POLICY_VERSION = (1 << 53) - 1
MAX_DLP_ITEMS = 100
MAX_GROUPS_ITEMS = 256
# Longest accepted text per field (characters); anything else defaults to DEFAULT_TEXT.
TEXT_LIMITS = {
    "url": 65536,
    "detail": 16384,
    "client": 256,
    "user": 1024,
    "method": 32,
    "action": 64,
    "rule": 1024,
    "category": 1024,
    "application": 1024,
    "node": 256,
    "time": 64,
    "transfer": 64,
    "tls": 64,
}
DEFAULT_TEXT = 4096


def _number(obj: dict[str, Any], key: str, low: float, high: float) -> None:
    value = obj.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # a wrong type is `rows.record_row`'s to name
    if isinstance(value, float) and not math.isfinite(value):
        raise MalformedRecord(f"{key!r} is not finite")
    if value < 0 <= low:
        raise MalformedRecord(f"{key!r} must not be negative: {value!r}")
    if not low <= value <= high:
        raise MalformedRecord(f"{key!r} out of range: {value!r} (allowed {low:g} .. {high:g})")


def check_record(obj: Any) -> Any:
    """`obj` itself when every value is within bounds; MalformedRecord names the first that is not."""
    if not isinstance(obj, dict):
        raise MalformedRecord(f"not a JSON object but {type(obj).__name__}")
    for key, value in obj.items():
        if isinstance(value, str):
            limit = TEXT_LIMITS.get(key, DEFAULT_TEXT)
            if len(value) > limit:
                raise MalformedRecord(f"{key!r} is {len(value)} characters long (at most {limit})")
    _number(obj, "bytes_in", 0, MAX_BYTES)
    _number(obj, "bytes_out", 0, MAX_BYTES)
    _number(obj, "status", 0, MAX_STATUS)
    _number(obj, "duration_ms", 0, MAX_DURATION_MS)
    _number(obj, "ts", MIN_TIME, MAX_TIME)
    version = obj.get("policy_version")
    if isinstance(version, int) and not isinstance(version, bool):
        _number(obj, "policy_version", 0, MAX_POLICY_VERSION)
    elif isinstance(version, str) and len(version) > 64:
        raise MalformedRecord("'policy_version' is too long")
    dlp = obj.get("dlp")
    if isinstance(dlp, list) and dlp:  # most records have none: no json.dumps of []
        if len(dlp) > MAX_DLP_ITEMS:
            raise MalformedRecord(f"'dlp' has {len(dlp)} items (at most {MAX_DLP_ITEMS})")
        if len(json.dumps(dlp)) > TEXT_LIMITS["detail"]:
            raise MalformedRecord("'dlp' is too long")
    groups = obj.get("groups")
    if isinstance(groups, list) and groups:  # nearly every record has some: no json.dumps here
        if len(groups) > MAX_GROUPS_ITEMS:
            raise MalformedRecord(f"'groups' has {len(groups)} items (at most {MAX_GROUPS_ITEMS})")
        if sum(len(name) for name in groups if isinstance(name, str)) > TEXT_LIMITS["detail"]:
            raise MalformedRecord("'groups' is too long")
    detail = obj.get("detail")
    if detail is not None and not isinstance(detail, str) and len(json.dumps(detail)) > TEXT_LIMITS["detail"]:
        raise MalformedRecord("'detail' is too long")
    return obj


class QuarantineFile:
    """`<state-dir>/quarantine.jsonl`: one JSON line per record set aside at ingest."""

    def __init__(self, path: str | Path, *, rotate_bytes: int = 50 << 20, keep: int = 3) -> None:
        self.path = Path(path)
        self.count = 0  # records quarantined since start (for /metrics and the status pages)
        self._lock = threading.Lock()
        self._file = RotatingFile(str(self.path), rotate_bytes=rotate_bytes, keep=keep, mode=0o600)

    def add(self, entries: list[dict[str, Any]]) -> None:
        """Append quarantined records (dicts with node, segment, seq, received, reason, raw)."""
        if not entries:
            return
        lines = []
        for entry in entries:
            raw = entry.get("raw", b"")
            entry = {**entry, "raw": raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw}
            lines.append(json.dumps(entry, sort_keys=True).encode("utf-8") + b"\n")
        with self._lock:
            self.count += len(entries)
            try:
                self._file.write(b"".join(lines))
            except OSError as e:
                log.error("cannot write the quarantine file {path}: {why}", path=str(self.path), why=str(e))
        first = entries[0]
        log.warn(
            "{n} access records from {node} set aside in {path} (e.g. segment {segment} seq {seq}: {reason})",
            n=len(entries), node=first.get("node"), path=self.path.name, segment=first.get("segment"),
            seq=first.get("seq"), reason=first.get("reason"),
        )

    def close(self) -> None:
        self._file.close()


def quarantining(ingest, reports, quarantine: QuarantineFile):
    """Wrap a store's `ingest(node, segment, first_seq, records)` so that what it quarantined is
    also written to the quarantine file (for worker threads, like `ingest`)."""

    def wrapped(node: str, segment: int, first_seq: int, records: list[bytes]):
        result = ingest(node, segment, first_seq, records)
        if result.quarantined:
            # The store's own quarantine (either backend) holds them; the newest rows are this batch's.
            last = first_seq + len(records) - 1
            recent = reports.quarantined(node=node, limit=len(records) + 1000)
            rows = [row for row in recent if row["segment"] == segment and first_seq <= row["seq"] <= last]
            quarantine.add(sorted(rows, key=lambda row: row["seq"]))
        return result

    return wrapped


__all__ = ["MAX_BYTES", "QuarantineFile", "check_record", "quarantining"]
