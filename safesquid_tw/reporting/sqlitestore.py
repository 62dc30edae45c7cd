"""The master's report store: every access record of the cluster, once, in SQLite.

Ingest is idempotent: a record is named by (node, segment, seq) and a name already stored (or
already quarantined) is counted as a duplicate and skipped, so a slave may re-ship a segment after
any crash. A batch is stored all or nothing: its raw rows, its quarantined ones and its roll-up
increments commit together or not at all, and `ingest` returns only once they are durable, so
the master may then acknowledge.

Roll-ups (requests, blocked and bytes per minute and per hour, and per hour the requests of every
domain, user, category and rule) are counted at ingest from the rows actually inserted, so a
dashboard over a day reads a few thousand roll-up rows instead of millions of records.

Threads: every public method may run in a worker thread (`deferToThread`). Writes go through one
writer connection behind a lock, because SQLite has a single writer anyway. Batches that arrive
while a commit is being synced are committed together by the next thread to get the lock (group
commit), each in its own savepoint: one fsync serves several slaves, and a batch that fails still
leaves nothing behind. Reads use one connection per thread and, in WAL mode, never wait for the
writer.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs

from safesquid_tw.reporting import fastrows
from safesquid_tw.reporting.recordcheck import check_record
from safesquid_tw.reporting.rows import MalformedRecord, host_of, record_row
from safesquid_tw.reporting.sqliteview import create_view, drop_view

# Actions that mean the gateway refused the request (policy or DLP); every other action counts
# as allowed in the roll-ups ("allow", "tunnel", "auth", "error", ...).
BLOCKED_ACTIONS = frozenset({"deny", "block"})
# The gateway could not serve the request (502/504 answers): counted apart, neither allowed nor blocked.
ERROR_ACTIONS = frozenset({"error"})
# Transfers the client left before the response was complete, counted in the roll-ups.
CLIENT_ABORTED = "client_aborted"
TOP_DIMENSIONS = ("domain", "user", "category", "application", "rule")
SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL, segment INTEGER NOT NULL, seq INTEGER NOT NULL,
    time REAL NOT NULL, minute INTEGER NOT NULL, client TEXT, user TEXT, method TEXT, url TEXT,
    host TEXT, host_rev TEXT,  -- host reversed: a domain and its subdomains are one index range
    status INTEGER, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL, duration_ms REAL,
    action TEXT, rule TEXT, category TEXT, application TEXT, policy_version INTEGER,
    dlp TEXT, detail TEXT,
    UNIQUE (node, segment, seq)
);
-- (columns added after the first release, e.g. requests.transfer, requests.tls and
-- requests.groups, are added by ReportStore on open: see _ADDED_COLUMNS)
CREATE INDEX IF NOT EXISTS requests_time ON requests (time);
CREATE INDEX IF NOT EXISTS requests_user ON requests (minute, user);
CREATE INDEX IF NOT EXISTS requests_client ON requests (minute, client);
CREATE INDEX IF NOT EXISTS requests_host ON requests (minute, host_rev);
CREATE INDEX IF NOT EXISTS requests_rule ON requests (minute, rule);
CREATE TABLE IF NOT EXISTS quarantine (
    node TEXT NOT NULL, segment INTEGER NOT NULL, seq INTEGER NOT NULL,
    received REAL NOT NULL, reason TEXT NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY (node, segment, seq)
);
CREATE TABLE IF NOT EXISTS rollup_minute (
    bucket INTEGER NOT NULL, node TEXT NOT NULL, requests INTEGER NOT NULL,
    blocked INTEGER NOT NULL, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
    PRIMARY KEY (bucket, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_hour (
    bucket INTEGER NOT NULL, node TEXT NOT NULL, requests INTEGER NOT NULL,
    blocked INTEGER NOT NULL, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
    PRIMARY KEY (bucket, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_top (
    dimension TEXT NOT NULL, bucket INTEGER NOT NULL, node TEXT NOT NULL, key TEXT NOT NULL,
    requests INTEGER NOT NULL, blocked INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (dimension, bucket, node, key)
) WITHOUT ROWID;
-- (rollup_top_day, the daily top roll-up, is made by ReportStore on open: see _ADDED_TABLES)
CREATE TABLE IF NOT EXISTS node_drops (
    node TEXT PRIMARY KEY, total_dropped INTEGER NOT NULL, reported REAL NOT NULL
);
"""

# Columns added since the first schema: (table, column, definition). A store made by an older
# release gains them at open (ALTER TABLE ... ADD COLUMN is instant in SQLite).
_ADDED_COLUMNS = (
    ("requests", "transfer", "TEXT"),
    ("requests", "tls", "TEXT"),
    ("requests", "groups", "TEXT"),  # JSON array of the user's policy groups; NULL when none
    ("rollup_minute", "errors", "INTEGER NOT NULL DEFAULT 0"),
    ("rollup_minute", "aborted", "INTEGER NOT NULL DEFAULT 0"),
    ("rollup_hour", "errors", "INTEGER NOT NULL DEFAULT 0"),
    ("rollup_hour", "aborted", "INTEGER NOT NULL DEFAULT 0"),
)


# Tables added since the first schema: (name, definition, SQL that fills it from older tables).
# A store made by an older release gains them at open, filled from what it already holds.
# rollup_top_day: the top roll-up per UTC day for the whole cluster (no node: a day holds at most
# one row per distinct key, however many nodes and records), so that a top list over a week reads
# a few hundred thousand rows at most instead of every hour of every node.
ROLLUP_TOP_DAY = """CREATE TABLE IF NOT EXISTS rollup_top_day (
    dimension TEXT NOT NULL, bucket INTEGER NOT NULL, key TEXT NOT NULL,
    requests INTEGER NOT NULL, blocked INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (dimension, bucket, key)
) WITHOUT ROWID"""
# The daily top roll-up of the hours in [?1, ?2) (whole days), summed from the cluster-wide
# hourly one (the same statement serves both stores).
FILL_TOP_DAY = (
    "INSERT INTO rollup_top_day (dimension, bucket, key, requests, blocked, bytes)"
    " SELECT dimension, bucket - bucket % 86400, key, sum(requests), sum(blocked), sum(bytes)"
    " FROM rollup_top_hour WHERE bucket >= ?1 AND bucket < ?2 GROUP BY 1, 2, 3"
)
# rollup_top_hour (schema version 4): the hourly top roll-up for the whole cluster (no node), which
# cluster-wide top lists read (the PostgreSQL store keeps only this one; here the per-node
# `rollup_top` stays for top lists of one node). Filled from the per-node one.
ROLLUP_TOP_HOUR = """CREATE TABLE IF NOT EXISTS rollup_top_hour (
    dimension TEXT NOT NULL, bucket INTEGER NOT NULL, key TEXT NOT NULL,
    requests INTEGER NOT NULL, blocked INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (dimension, bucket, key)
) WITHOUT ROWID"""
FILL_TOP_HOUR = (
    "INSERT INTO rollup_top_hour (dimension, bucket, key, requests, blocked, bytes)"
    " SELECT dimension, bucket, key, sum(requests), sum(blocked), sum(bytes)"
    " FROM rollup_top WHERE bucket >= ?1 AND bucket < ?2 GROUP BY 1, 2, 3"
)
# In order: the daily roll-up of a version 2 store is filled from the hourly one made just before.
_ADDED_TABLES = (("rollup_top_hour", ROLLUP_TOP_HOUR, FILL_TOP_HOUR), ("rollup_top_day", ROLLUP_TOP_DAY, FILL_TOP_DAY))


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, definition in _ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    for table, definition, fill in _ADDED_TABLES:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        if not exists:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(definition)
            conn.execute(fill, (-(2**62), 2**62))
            conn.execute("COMMIT")

# Positions in a row as inserted (node, segment, seq, then `record_row`), for the roll-ups.
_ROW = ("node", "segment", "seq", "time", "minute", "client", "user", "method", "url", "host",
        "host_rev", "status", "bytes_in", "bytes_out", "duration_ms", "action", "rule", "category",
        "application", "policy_version", "dlp", "detail", "transfer", "tls", "groups")  # fmt: skip
_MINUTE, _ACTION = _ROW.index("minute"), _ROW.index("action")
_TRANSFER = _ROW.index("transfer")
_BYTES_IN, _BYTES_OUT = _ROW.index("bytes_in"), _ROW.index("bytes_out")
_TOP_COLUMNS = tuple(
    (dimension, _ROW.index(column))
    for dimension, column in (
        ("domain", "host"), ("user", "user"), ("category", "category"), ("application", "application"), ("rule", "rule")
    )
)
_INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(_ROW)}) VALUES ({', '.join('?' * len(_ROW))})"
)
_INSERT_QUARANTINE = "INSERT INTO quarantine (node, segment, seq, received, reason, raw) VALUES (?,?,?,?,?,?)"
_EXISTING = (
    "SELECT seq FROM requests WHERE node = ?1 AND segment = ?2 AND seq BETWEEN ?3 AND ?4"
    " UNION ALL SELECT seq FROM quarantine WHERE node = ?1 AND segment = ?2 AND seq BETWEEN ?3 AND ?4"
)
_BUMP_TOTALS = (
    "INSERT INTO {table} (bucket, node, requests, blocked, bytes_in, bytes_out, errors, aborted)"
    " VALUES (?,?,?,?,?,?,?,?)"
    " ON CONFLICT (bucket, node) DO UPDATE SET requests = requests + excluded.requests,"
    " blocked = blocked + excluded.blocked, bytes_in = bytes_in + excluded.bytes_in,"
    " bytes_out = bytes_out + excluded.bytes_out, errors = errors + excluded.errors,"
    " aborted = aborted + excluded.aborted"
)
_BUMP_MINUTE = _BUMP_TOTALS.format(table="rollup_minute")
_BUMP_HOUR = _BUMP_TOTALS.format(table="rollup_hour")
_BUMP_TOP_DAY = (
    "INSERT INTO rollup_top_day (dimension, bucket, key, requests, blocked, bytes)"
    " VALUES (?,?,?,?,?,?) ON CONFLICT (dimension, bucket, key) DO UPDATE SET"
    " requests = requests + excluded.requests, blocked = blocked + excluded.blocked,"
    " bytes = bytes + excluded.bytes"
)
_BUMP_TOP_HOUR = _BUMP_TOP_DAY.replace("rollup_top_day", "rollup_top_hour")
_BUMP_TOP = (
    "INSERT INTO rollup_top (dimension, bucket, node, key, requests, blocked, bytes)"
    " VALUES (?,?,?,?,?,?,?) ON CONFLICT (dimension, bucket, node, key) DO UPDATE SET"
    " requests = requests + excluded.requests, blocked = blocked + excluded.blocked,"
    " bytes = bytes + excluded.bytes"
)
_COLUMNS = (
    "node", "segment", "seq", "time", "client", "user", "method", "url", "host", "status",
    "bytes_in", "bytes_out", "duration_ms", "action", "rule", "category", "application",
    "policy_version", "dlp", "detail", "transfer", "tls", "groups",
)  # fmt: skip
_SELECT_COLUMNS = ", ".join(_COLUMNS)
_FILTERS = frozenset(
    {"start", "end", "node", "user", "client", "domain", "rule", "status", "action", "category", "transfer", "tls"}
)
# tls filter values: "inspected", "bypassed", or "none" (plain HTTP: no TLS key in the record).
TLS_FILTER_VALUES = ("inspected", "bypassed", "none")


@attrs.frozen
class IngestResult:
    inserted: int
    duplicates: int
    quarantined: int


_Rollups = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]],
                 list[tuple[Any, ...]]]


@attrs.define
class _Batch:
    """A batch parsed outside the write lock, with its roll-up increments counted in advance."""

    key: tuple[str, int, int, int]  # node, segment, first seq, last seq
    rows: list[tuple[Any, ...]]
    quarantine: list[tuple[Any, ...]]
    rollups: _Rollups
    result: IngestResult | None = None
    error: BaseException | None = None


def _prepare(node: str, segment: int, first_seq: int, records: list[bytes], received: float) -> _Batch:
    rows: list[tuple[Any, ...]] = []
    quarantine: list[tuple[Any, ...]] = []
    loads = json.loads
    for seq, raw, row in zip(itertools.count(first_seq), records, fastrows.decode(records)):
        if row is not None:  # the proxy's usual shape, checked while decoding
            rows.append((node, segment, seq, *row))
            continue
        try:  # anything else: the generic checks store it or say why not
            rows.append((node, segment, seq, *record_row(check_record(loads(raw)))))
            continue
        except MalformedRecord as e:
            reason = str(e)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            reason = f"not JSON: {e}"
        quarantine.append((node, segment, seq, received, reason, bytes(raw)))
    last_seq = first_seq + len(records) - 1
    return _Batch((node, segment, first_seq, last_seq), rows, quarantine, _rollups(rows))


def _store(conn: sqlite3.Connection, batch: _Batch) -> IngestResult:
    """Insert what is new of a batch and count it into the roll-ups (inside a transaction)."""
    rows, quarantine = batch.rows, batch.quarantine
    if not rows and not quarantine:
        return IngestResult(0, 0, 0)
    existing = {seq for (seq,) in conn.execute(_EXISTING, batch.key)}
    minutes, hours, tops, days, cluster_hours = batch.rollups
    if existing:  # a re-shipped batch: keep only the records never seen, count only those
        rows = [row for row in rows if row[2] not in existing]
        quarantine = [row for row in quarantine if row[2] not in existing]
        minutes, hours, tops, days, cluster_hours = _rollups(rows)
    conn.executemany(_INSERT_REQUEST, rows)
    conn.executemany(_INSERT_QUARANTINE, quarantine)
    conn.executemany(_BUMP_MINUTE, minutes)
    conn.executemany(_BUMP_HOUR, hours)
    conn.executemany(_BUMP_TOP, tops)
    conn.executemany(_BUMP_TOP_DAY, days)
    conn.executemany(_BUMP_TOP_HOUR, cluster_hours)
    return IngestResult(len(rows), len(existing), len(quarantine))


def _rollups(rows: list[tuple[Any, ...]]) -> _Rollups:
    """Parameters of the minute, hour, top and daily top roll-up upserts that count `rows`."""
    minutes: dict[tuple[int, str], list[int]] = {}
    tops: dict[tuple[str, int, str, str], list[int]] = {}
    blocked_actions, error_actions = BLOCKED_ACTIONS, ERROR_ACTIONS
    columns = _TOP_COLUMNS
    for row in rows:
        node = row[0]
        minute = row[_MINUTE] * 60
        action = row[_ACTION]
        blocked = 1 if action in blocked_actions else 0
        bytes_in, bytes_out = row[_BYTES_IN], row[_BYTES_OUT]
        totals = minutes.get((minute, node))
        if totals is None:
            minutes[(minute, node)] = [1, blocked, bytes_in, bytes_out, 1 if action in error_actions else 0,
                                       1 if row[_TRANSFER] == CLIENT_ABORTED else 0]
        else:
            totals[0] += 1
            totals[1] += blocked
            totals[2] += bytes_in
            totals[3] += bytes_out
            if action in error_actions:
                totals[4] += 1
            if row[_TRANSFER] == CLIENT_ABORTED:
                totals[5] += 1
        hour = minute - minute % 3600
        size = bytes_in + bytes_out
        for dimension, column in columns:
            key = row[column]
            if key is None:
                continue
            top = tops.get((dimension, hour, node, key))
            if top is None:
                tops[(dimension, hour, node, key)] = [1, blocked, size]
            else:
                top[0] += 1
                top[1] += blocked
                top[2] += size
    days: dict[tuple[str, int, str], list[int]] = {}
    cluster_hours: dict[tuple[str, int, str], list[int]] = {}
    for (dimension, hour, _node, key), counts in tops.items():
        for wider, bucket in ((days, hour - hour % 86400), (cluster_hours, hour)):
            summed = wider.get((dimension, bucket, key))
            if summed is None:
                wider[(dimension, bucket, key)] = counts.copy()
            else:
                summed[0] += counts[0]
                summed[1] += counts[1]
                summed[2] += counts[2]
    hours: dict[tuple[int, str], list[int]] = {}
    for (minute, node), totals in minutes.items():
        summed = hours.setdefault((minute - minute % 3600, node), [0, 0, 0, 0, 0, 0])
        for i in range(6):
            summed[i] += totals[i]
    return (
        [(*k, *t) for k, t in minutes.items()],
        [(*k, *t) for k, t in hours.items()],
        [(*k, *t) for k, t in tops.items()],
        [(*k, *t) for k, t in days.items()],
        [(*k, *t) for k, t in cluster_hours.items()],
    )


# The hour roll-up of the hours in [?1, ?2), summed from the minute one.
FILL_HOUR = (
    "INSERT INTO rollup_hour (bucket, node, requests, blocked, bytes_in, bytes_out, errors, aborted)"
    " SELECT bucket - bucket % 3600, node, sum(requests), sum(blocked), sum(bytes_in), sum(bytes_out),"
    " sum(errors), sum(aborted) FROM rollup_minute WHERE bucket >= ?1 AND bucket < ?2 GROUP BY 1, 2"
)


def recount_after_prune(execute: Callable[[str, tuple[Any, ...]], Any], older_than: float) -> None:
    """After retention removed the minute and hourly roll-up buckets that end by `older_than`:
    count again the hour roll-up of the hour `older_than` falls in (from its minutes left) and the
    daily top roll-up of its day (from its hours left), and drop the daily rows of earlier days,
    so that the coarser roll-ups say what the finer ones say. `execute` runs SQLite-style SQL
    (`?N`) in the caller's transaction: the same statements serve both stores."""
    hour = int(older_than // 3600) * 3600
    execute("DELETE FROM rollup_hour WHERE bucket = ?1", (hour,))
    execute(FILL_HOUR, (hour, hour + 3600))
    day = int(older_than // 86400) * 86400
    execute("DELETE FROM rollup_top_day WHERE bucket < ?1", (older_than,))
    execute("DELETE FROM rollup_top_day WHERE bucket = ?1", (day,))
    execute(FILL_TOP_DAY, (day, day + 86400))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the hot index pages stay in memory
    conn.execute("PRAGMA temp_store = MEMORY")
    return conn


class ReportStore:
    """Access records of every node, their roll-ups, quarantined records and drop counters."""

    def __init__(self, path: str | Path, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._wall_clock = wall_clock
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Batch] = []
        self._writer = _connect(self.path)
        self._writer.execute("PRAGMA journal_mode = WAL")
        # FULL, not NORMAL: in WAL mode NORMAL syncs only at checkpoints, so a power loss could
        # roll back transactions already committed, and acknowledged, whose slave has since
        # deleted the segment: records lost for good. FULL syncs the WAL at every commit; that
        # is one fsync per batch of hundreds of records, which ingest can afford.
        self._writer.execute("PRAGMA synchronous = FULL")
        with self._write_lock:
            # access_records, the stable view for administrators' SQL, is dropped before the
            # tables change and made again after, from the columns they have by then.
            drop_view(self._writer)
            self._writer.executescript(_SCHEMA)
            _add_missing_columns(self._writer)
            create_view(self._writer)
            self._writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    def close(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        with self._write_lock:
            self._writer.close()

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (for queries such as `reporting.aggregate`)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    # -- writing --------------------------------------------------------------------------------

    def ingest(self, node: str, segment: int, first_seq: int, records: list[bytes]) -> IngestResult:
        """Store a batch (record i is (node, segment, first_seq + i)) all or nothing, durably.

        Blocks on disk I/O: call it in a worker thread. Concurrent calls share commits.
        """
        batch = _prepare(node, segment, first_seq, records, self._wall_clock())
        with self._queue_lock:
            self._queue.append(batch)
        with self._write_lock:
            if batch.result is None and batch.error is None:  # nobody took it along: lead
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit(group, leader=batch)
        if batch.error is not None:
            raise batch.error
        assert batch.result is not None
        return batch.result

    def ingest_many(
        self, batches: Iterable[tuple[str, int, int, list[bytes]]]
    ) -> list[IngestResult | Exception]:
        """Several (node, segment, first_seq, records) batches in one commit; each is stored
        all or nothing, and its place in the answer holds its result or its error."""
        prepared = [_prepare(*batch, self._wall_clock()) for batch in batches]
        with self._write_lock:
            self._commit(prepared, leader=None)
        return [b.error if b.error is not None else b.result for b in prepared]  # type: ignore[misc]

    def _commit(self, group: list[_Batch], leader: _Batch | None) -> None:
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            for batch in group:
                conn.execute("SAVEPOINT batch")
                try:
                    batch.result = _store(conn, batch)
                except Exception as e:
                    conn.execute("ROLLBACK TO batch")
                    batch.error = e
                conn.execute("RELEASE batch")
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for batch in group:
                batch.result = None
                batch.error = e if batch is leader else copy.copy(e)
            if leader is None:
                raise

    def record_dropped(self, node: str, total_dropped: int) -> None:
        """A node's running total of records its spool dropped at its size cap.

        Totals only grow, so the larger of the stored and reported value wins: a late message
        from before a reconnect cannot lower it.
        """
        with self._write_lock:
            self._writer.execute(
                "INSERT INTO node_drops (node, total_dropped, reported) VALUES (?, ?, ?)"
                " ON CONFLICT (node) DO UPDATE SET reported = excluded.reported,"
                " total_dropped = max(total_dropped, excluded.total_dropped)",
                (node, int(total_dropped), self._wall_clock()),
            )

    def prune(self, older_than: float, batch: int = 5000) -> int:
        """Delete records with time < `older_than` (and roll-up buckets that end by then, and
        quarantined records received before then), `batch` rows per transaction so a running
        ingest waits for one small delete at most. Returns the number of records deleted."""
        deleted = 0
        while True:
            removed = self._write(
                "DELETE FROM requests WHERE id IN"
                " (SELECT id FROM requests WHERE time < ? ORDER BY time LIMIT ?)",
                (older_than, batch),
            )
            deleted += removed
            if removed < batch:
                break
        while self._write(
            "DELETE FROM quarantine WHERE rowid IN"
            " (SELECT rowid FROM quarantine WHERE received < ? LIMIT ?)",
            (older_than, batch),
        ) == batch:
            pass
        # The minute and hour totals hold one row per node and bucket: a day of them goes in one
        # short delete each (one transaction per minute bucket cost a sync each, 1,440 a day).
        for table, span in (("rollup_minute", 60), ("rollup_hour", 3600)):
            self._write(f"DELETE FROM {table} WHERE bucket <= ?", (older_than - span,))
        for table, span in (("rollup_top", 3600), ("rollup_top_hour", 3600)):
            buckets = self.reader().execute(
                f"SELECT DISTINCT bucket FROM {table} WHERE bucket <= ?", (older_than - span,)
            ).fetchall()
            for (bucket,) in buckets:  # one bucket per transaction keeps every delete short
                self._write(f"DELETE FROM {table} WHERE bucket = ?", (bucket,))
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                recount_after_prune(conn.execute, older_than)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return deleted

    def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        with self._write_lock:
            return self._writer.execute(sql, params).rowcount

    # -- reading --------------------------------------------------------------------------------

    def count(self, **filters: Any) -> int:
        """Records matching the filters of `search` (all optional; without both `start` and
        `end`, a user, client, domain or rule filter reads the whole table)."""
        where, params = _where(filters)
        return self.reader().execute(f"SELECT count(*) FROM requests{where}", params).fetchone()[0]

    def search(
        self,
        *,
        start: float,
        end: float,
        node: str | None = None,
        user: str | None = None,
        client: str | None = None,
        domain: str | None = None,
        rule: str | None = None,
        status: int | None = None,
        action: str | None = None,
        category: str | None = None,
        transfer: str | None = None,
        tls: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Records with start <= time < end matching every filter given, newest first.

        `domain` matches that host and its subdomains; the others match exactly.
        """
        filters = {
            "start": start, "end": end, "node": node, "user": user, "client": client,
            "domain": domain, "rule": rule, "status": status, "action": action, "category": category,
            "transfer": transfer,
            "tls": tls,
        }  # fmt: skip
        where, params = _where(filters)
        rows = self.reader().execute(
            f"SELECT {_SELECT_COLUMNS} FROM requests{where} ORDER BY time DESC LIMIT ? OFFSET ?",
            (*params, int(limit), int(offset)),
        )
        found = []
        for row in rows:
            record = dict(zip(_COLUMNS, row))
            record["dlp"] = json.loads(record["dlp"]) if record["dlp"] else []
            record["groups"] = json.loads(record["groups"]) if record["groups"] else []
            found.append(record)
        return found

    def quarantined(self, *, node: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Records that could not be stored, newest first, with the reason and the raw bytes."""
        sql = "SELECT node, segment, seq, received, reason, raw FROM quarantine"
        params: tuple[Any, ...] = ()
        if node is not None:
            sql, params = sql + " WHERE node = ?", (node,)
        rows = self.reader().execute(sql + " ORDER BY received DESC LIMIT ?", (*params, limit))
        keys = ("node", "segment", "seq", "received", "reason", "raw")
        return [dict(zip(keys, row)) for row in rows]

    def dropped_totals(self) -> dict[str, int]:
        """Per node, the records its spool dropped at the cap (as last reported)."""
        rows = self.reader().execute("SELECT node, total_dropped FROM node_drops ORDER BY node")
        return dict(rows.fetchall())


# The user, client, host and rule indexes lead with the minute of the record, so that a batch
# of records, which all fall in a few minutes, touches a few index pages rather than one page per
# record (random keys would have every commit rewrite thousands of pages into the WAL). A search
# therefore names each minute of its period: one index seek per minute.
_MINUTES = (
    "minute IN (WITH RECURSIVE span(m) AS (SELECT ? UNION ALL SELECT m + 1 FROM span WHERE m < ?)"
    " SELECT m FROM span)"
)
_MINUTE_INDEXED = ("user", "client", "domain", "rule")


def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    unknown = set(filters) - _FILTERS
    if unknown:
        raise TypeError(f"unknown record filters: {', '.join(sorted(unknown))}")
    clauses: list[str] = []
    params: list[Any] = []
    start, end = filters.get("start"), filters.get("end")
    if start is not None:
        clauses.append("time >= ?")
        params.append(float(start))
    if end is not None:
        clauses.append("time < ?")
        params.append(float(end))
    if start is not None and end is not None and any(filters.get(k) is not None for k in _MINUTE_INDEXED):
        clauses.append(_MINUTES)
        params += [math.floor(start / 60), math.ceil(end / 60)]
    for key in ("user", "client", "rule"):
        if filters.get(key) is not None:
            clauses.append(f"{key} = ?")
            params.append(filters[key])
    for key in ("node", "status", "action", "category"):
        if filters.get(key) is not None:
            # Unary + keeps these few-valued columns from steering the planner to an index that
            # does not narrow the time (the (node, segment, seq) one would scan a whole node).
            clauses.append(f"+{key} = ?")
            params.append(filters[key])
    transfer = filters.get("transfer")
    if transfer is not None:
        # Records stored before the key existed have none: they were complete as far as anyone knew.
        clauses.append("coalesce(transfer, 'complete') = ?")
        params.append(transfer)
    tls = filters.get("tls")
    if tls is not None:
        if tls == "none":
            clauses.append("+tls IS NULL")
        else:
            clauses.append("+tls = ?")
            params.append(tls)
    domain = filters.get("domain")
    if domain is not None:
        reversed_domain = domain.lower().rstrip(".")[::-1]
        # The range [d, d + "/") holds d and every d + "." + ...; the substr test drops the
        # few others in it ("example.com-x" reversed).
        clauses.append("host_rev >= ? AND host_rev < ? AND (host_rev = ? OR substr(host_rev, ?, 1) = '.')")
        params += [reversed_domain, reversed_domain + "/", reversed_domain, len(reversed_domain) + 1]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


__all__ = [
    "BLOCKED_ACTIONS",
    "FILL_TOP_DAY",
    "FILL_TOP_HOUR",
    "ROLLUP_TOP_HOUR",
    "ROLLUP_TOP_DAY",
    "CLIENT_ABORTED",
    "ERROR_ACTIONS",
    "TOP_DIMENSIONS",
    "IngestResult",
    "MalformedRecord",
    "ReportStore",
    "host_of",
    "recount_after_prune",
    "record_row",
]
