"""Copy an existing SQLite report store into PostgreSQL: `python -m safesquid_tw.reporting.migrate
SQLITE_PATH POSTGRES_URL`.

Exactly once: every record keeps its name (node, segment, seq) and goes through the PostgreSQL
store's own ingest, which skips names already stored and counts the roll-ups of what it inserts.
Resumable: the last copied row of the SQLite table is remembered in PostgreSQL
(`migration_progress`, one row per source file) after every chunk; a run that stops anywhere
starts again after that row, and anything copied past it is recognised as a duplicate. Quarantined
records and the spool drop counters are copied too. Stop the master (or point it at PostgreSQL)
first: records that arrive in the SQLite file during the copy are picked up by running it again.

The password comes from PGPASSFILE/~/.pgpass or `--password-file`, never the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from safesquid_tw.reporting.backend import ReportStoreError, check_url, masked, read_password_file

CHUNK = 10_000
# Columns of the SQLite `requests` table turned back into the access record's keys (`dlp` and
# `groups`, JSON text there, are decoded apart; a store older than a column has none to copy).
_RECORD_KEYS = ("client", "user", "method", "url", "status", "bytes_in", "bytes_out", "duration_ms",
                "action", "rule", "category", "application", "policy_version", "detail", "transfer", "tls")


class Progress:
    """A one-line progress bar on a terminal (a line per 10% otherwise)."""

    def __init__(self, total: int, done: int, out: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.done, self.out, self.width = max(total, 1), done, out, width
        self.started = time.monotonic()
        self.start_done = done
        self.tty = out.isatty()
        self._last_tenth = -1

    def advance(self, count: int) -> None:
        self.done += count
        fraction = min(self.done / self.total, 1.0)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (self.done - self.start_done) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(fraction * self.width)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction:6.1%} {self.done:,}/{self.total:,}"
                f" records {rate:,.0f}/s ETA {left:,.0f}s")
        if self.tty:
            self.out.write("\r" + line)
        elif int(fraction * 10) != self._last_tenth:
            self._last_tenth = int(fraction * 10)
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")


def _record(row: dict[str, Any]) -> bytes:
    record: dict[str, Any] = {"ts": row["time"], "node": row["node"]}
    for key in _RECORD_KEYS:
        if row.get(key) is not None:
            record[key] = row[key]
    record["dlp"] = json.loads(row["dlp"]) if row.get("dlp") else []
    record["groups"] = json.loads(row["groups"]) if row.get("groups") else []
    return json.dumps(record).encode()


def _batches(rows: list[dict[str, Any]]) -> Iterator[tuple[str, int, int, list[bytes]]]:
    """Runs of consecutive names (same node and segment, seq + 1) as ingest batches."""
    run: list[dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: (r["node"], r["segment"], r["seq"])):
        if run and (row["node"], row["segment"], row["seq"]) != (run[-1]["node"], run[-1]["segment"], run[-1]["seq"] + 1):
            yield run[0]["node"], run[0]["segment"], run[0]["seq"], [_record(r) for r in run]
            run = []
        run.append(row)
    if run:
        yield run[0]["node"], run[0]["segment"], run[0]["seq"], [_record(r) for r in run]


def migrate(sqlite_path: Path, store: Any, *, chunk: int = CHUNK, out: TextIO = sys.stderr,
            stop_after: int | None = None) -> dict[str, int]:
    """Copy every record, quarantined record and drop counter not yet copied; return counts.
    `stop_after` (chunks) exists for tests of resumption."""
    source = str(sqlite_path.resolve())
    lite = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    lite.row_factory = sqlite3.Row
    with store._write_lock:
        conn = store._connection()
        found = conn.execute("SELECT last_id, copied FROM migration_progress WHERE source = %s", (source,)).fetchone()
    last_id, copied = found if found else (0, 0)
    total = lite.execute("SELECT count(*) FROM requests").fetchone()[0]
    before = lite.execute("SELECT count(*) FROM requests WHERE id <= ?", (last_id,)).fetchone()[0]
    progress = Progress(total, before, out)
    counts = {"inserted": 0, "duplicates": 0, "chunks": 0}
    try:
        while stop_after is None or counts["chunks"] < stop_after:
            rows = [dict(r) for r in lite.execute(
                "SELECT * FROM requests WHERE id > ? ORDER BY id LIMIT ?", (last_id, chunk))]
            if not rows:
                break
            for result in store.ingest_many(list(_batches(rows))):
                if isinstance(result, Exception):
                    raise result
                counts["inserted"] += result.inserted
                counts["duplicates"] += result.duplicates
            last_id = rows[-1]["id"]
            copied += len(rows)
            store._write(
                "INSERT INTO migration_progress (source, last_id, copied, updated) VALUES (%s, %s, %s, now())"
                " ON CONFLICT (source) DO UPDATE SET last_id = excluded.last_id, copied = excluded.copied,"
                " updated = now()",
                (source, last_id, copied),
            )
            counts["chunks"] += 1
            progress.advance(len(rows))
    finally:
        progress.finish()
    quarantined = 0
    for entry in lite.execute("SELECT node, segment, seq, received, reason, raw FROM quarantine"):
        quarantined += store._write(
            "INSERT INTO quarantine (node, segment, seq, received, reason, raw) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING", tuple(entry))
    for node, total_dropped in lite.execute("SELECT node, total_dropped FROM node_drops"):
        store.record_dropped(node, total_dropped)
    lite.close()
    counts["quarantined"] = quarantined
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safesquid_tw.reporting.migrate",
        description="Copy a SQLite report store (<state-dir>/reports.sqlite3) into PostgreSQL, exactly once;"
                    " run it again to resume or to pick up records added since.")
    parser.add_argument("sqlite_path", type=Path)
    parser.add_argument("postgres_url", help="postgresql://USER@HOST:PORT/DBNAME (no password here)")
    parser.add_argument("--password-file", help="file whose first line is the password (else PGPASSFILE/~/.pgpass)")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="records per commit (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        check_url("report-store", args.postgres_url)
        password = read_password_file(args.password_file) if args.password_file else None
    except (ReportStoreError, OSError) as e:
        parser.error(str(e).replace("--report-store", "POSTGRES_URL"))
    if not args.sqlite_path.is_file():
        parser.error(f"{args.sqlite_path}: no such file")
    from safesquid_tw.reporting.pgstore import PostgresReportStore

    store = PostgresReportStore(args.postgres_url, password=password)
    try:
        if not store.available():
            print(f"cannot reach {masked(args.postgres_url)}", file=sys.stderr)
            return 1
        counts = migrate(args.sqlite_path, store, chunk=args.chunk)
    finally:
        store.close()
    print(f"copied {counts['inserted']:,} records ({counts['duplicates']:,} already there),"
          f" {counts['quarantined']:,} quarantined records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PGAPPNAME", "safesquid-tw-migrate")
    sys.exit(main())
