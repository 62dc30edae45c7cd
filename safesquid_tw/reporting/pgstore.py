"""The report store in PostgreSQL: the same interface as the embedded SQLite store.

Ingest keeps the SQLite store's promises: a record is named by (node, segment, seq) and stored
once however often it is shipped; a batch is stored all or nothing; `ingest` returns only once
the batch is committed (synchronous_commit: durable), so the master acknowledges only then and a
slave re-ships after any failure, the database being down included.

How a batch travels: the JSON is parsed and checked in the calling worker thread, outside any
lock, into ready-made COPY text and roll-up increments. One writer connection, behind a lock,
commits: batches that arrive while a commit is in flight are taken along by the next one (group
commit), each in its own savepoint; the names already stored are looked up with one indexed query
per batch (pruned to the partitions of the batch's times), the new rows go in with COPY, and the
roll-up increments of the whole group are merged and upserted with one statement per table.

Reads go through a small connection pool (psycopg-pool), to `read_url` when given (a replica).
`reader()` returns an object with the `execute(sql, params)` of a sqlite3 connection, so that the
roll-up queries of `reporting.aggregate` run unchanged here: it rewrites `?` and `?N` to psycopg
placeholders and returns whole numbers for SQL sums.

Every method blocks on the network: call it in a worker thread. When the database is unreachable
the methods raise `StoreUnavailable` (quickly: a failed connection is not retried for a few
seconds), which the portal turns into a "report store unavailable" page.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import itertools
import json
import math
import re
import threading
import time
import zlib
from decimal import Decimal
from typing import Any, Callable, Iterable, Iterator

import psycopg
from psycopg.adapt import Loader
from psycopg_pool import ConnectionPool, PoolTimeout

from safesquid_tw.reporting import fastrows, pgschema
from safesquid_tw.reporting.backend import StoreUnavailable
from safesquid_tw.reporting.recordcheck import check_record
from safesquid_tw.reporting.rows import MalformedRecord, record_row
from safesquid_tw.reporting.sqlitestore import (
    BLOCKED_ACTIONS, CLIENT_ABORTED, ERROR_ACTIONS, IngestResult, recount_after_prune,
)

RETRY_CONNECT_AFTER = 2.0  # seconds a failed connection is remembered before trying again
CONNECT_TIMEOUT = 5
# A database that hangs must not hold worker threads for ever: statements give up after these
# (the slave ships the batch again later; the page says the store is unavailable), and TCP
# keepalives notice a server that vanished from the network.
WRITE_TIMEOUT_MS = 60_000
READ_TIMEOUT_MS = 30_000
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
_UNAVAILABLE = (psycopg.OperationalError, psycopg.errors.QueryCanceled)
_INT32 = 2**31
_INT64 = 2**63

_RECORD_COLUMNS = (
    'node, segment, seq, time, client, "user", method, url, host, host_rev, status, bytes_in,'
    " bytes_out, duration_ms, action, rule, category, application, policy_version, dlp, detail,"
    " transfer, tls, groups"
)
_COPY_RECORDS = f"COPY requests ({_RECORD_COLUMNS}) FROM STDIN"


def _bump(table: str, columns: tuple[str, ...]) -> str:
    top = table.startswith("rollup_top")
    return f"ON CONFLICT ({', '.join(columns)}) DO UPDATE SET " + ", ".join(
        f"{c} = {table}.{c} + excluded.{c}"
        for c in ("requests", "blocked", "bytes_in", "bytes_out", "errors", "aborted")
        if not top or c in ("requests", "blocked")
    ) + (f", bytes = {table}.bytes + excluded.bytes" if top else "")


# Roll-up increments, counted in Python per batch and merged per commit, go in as one upsert per
# table from arrays (a few hundred to a few thousand rows per commit, however many records). Rows
# are sorted (by the server: ORDER BY) so that two writers lock shared rows in the same order
# (no deadlock).
_UPSERT_TOTALS = (
    "INSERT INTO {table} (bucket, node, requests, blocked, bytes_in, bytes_out, errors, aborted)"
    " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[],"
    " %s::bigint[], %s::bigint[]) ORDER BY 1, 2 {bump}"
)
_UPSERT_MINUTE = _UPSERT_TOTALS.format(table="rollup_minute", bump=_bump("rollup_minute", ("bucket", "node")))
_UPSERT_HOUR = _UPSERT_TOTALS.format(table="rollup_hour", bump=_bump("rollup_hour", ("bucket", "node")))
_UPSERT_TOPS = (
    "INSERT INTO {table} (dimension, bucket, key, requests, blocked, bytes)"
    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[])"
    " ORDER BY 1, 2, 3 {bump}"
)
_UPSERT_TOP_HOUR = _UPSERT_TOPS.format(
    table="rollup_top_hour", bump=_bump("rollup_top_hour", ("dimension", "bucket", "key")))
_UPSERT_TOP_DAY = _UPSERT_TOPS.format(
    table="rollup_top_day", bump=_bump("rollup_top_day", ("dimension", "bucket", "key")))
# Exactly once: the runs of names already stored that overlap the batches of a commit, looked up
# under a transaction-scoped lock on each (node, segment) so that another process writing the
# same names (a migration beside the master) waits for this commit instead of doubling them.
_LOCK_NAMES = "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k"
_STORED_RUNS = (
    "SELECT l.node, l.segment, l.first_seq, l.last_seq FROM unnest(%s::text[], %s::bigint[], %s::bigint[],"
    " %s::bigint[]) AS b(node, segment, lo, hi) JOIN ingest_ledger l ON l.node = b.node AND l.segment = b.segment"
    " AND l.last_seq >= b.lo AND l.first_seq <= b.hi"
)
_INSERT_RUNS = (
    "INSERT INTO ingest_ledger (node, segment, first_seq, last_seq, last_time)"
    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::float8[])"
)
# One node's top counts of one hour, from its records (index on (node, time)).
_FILL_NODE_HOUR = (
    "INSERT INTO rollup_top_node_hour (node, bucket, dimension, key, requests, blocked, bytes)"
    " SELECT %(node)s, %(hour)s, d.dimension, d.key, count(*),"
    " count(*) FILTER (WHERE action IN (" + ", ".join(f"'{a}'" for a in sorted(BLOCKED_ACTIONS)) + ")),"
    " sum(bytes_in + bytes_out) FROM requests CROSS JOIN LATERAL (VALUES ('domain', host), ('user', \"user\"),"
    " ('category', category), ('application', application), ('rule', rule)) AS d(dimension, key)"
    " WHERE node = %(node)s AND time >= to_timestamp(%(hour)s) AND time < to_timestamp(%(hour)s + 3600)"
    " AND d.key IS NOT NULL GROUP BY 3, 4"
)
_INSERT_QUARANTINE = (
    "INSERT INTO quarantine (node, segment, seq, received, reason, raw) VALUES (%s, %s, %s, %s, %s, %s)"
    " ON CONFLICT DO NOTHING"
)
_SELECT = (
    'node, segment, seq, extract(epoch FROM time)::double precision, client, "user", method, url,'
    " host, status, bytes_in, bytes_out, duration_ms, action, rule, category, application,"
    " policy_version, dlp, detail, transfer, tls, groups"
)
_COLUMNS = (
    "node", "segment", "seq", "time", "client", "user", "method", "url", "host", "status",
    "bytes_in", "bytes_out", "duration_ms", "action", "rule", "category", "application",
    "policy_version", "dlp", "detail", "transfer", "tls", "groups",
)  # fmt: skip
# Filters with an index (column, time) of their own: a search with one of them reads it in time
# order; one without them merges every node's newest records (index (node, time)).
_ORDERED_BY_INDEX = ("node", "user", "client", "domain", "rule")
_FILTERS = frozenset(
    {"start", "end", "node", "user", "client", "domain", "rule", "status", "action", "category", "transfer", "tls"}
)
# COPY text format: backslash, tab, newline and carriage return are escaped; PostgreSQL text
# cannot hold NUL at all, so it is dropped rather than failing the whole batch.
_JSON_NUL = "\\u0000"  # jsonb refuses it too
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": ""})


def _text(value: Any) -> str:
    if value is None:
        return "\\N"
    return str(value).translate(_ESCAPES)


_STORES = itertools.count(1)


class _Writer:
    """One writer connection with its lock and the queue of batches waiting for its next commit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue_lock = threading.Lock()
        self.queue: list[_Batch] = []
        self.conn: psycopg.Connection | None = None
        self.failed_at = 0.0


class _Batch:
    __slots__ = ("key", "days", "lines", "facts", "last_time", "quarantine", "result", "error", "writer")

    def __init__(self, key: tuple[str, int, int, int]) -> None:
        self.key = key  # node, segment, first seq, last seq
        self.days: set[int] = set()
        self.lines: list[str] = []  # COPY text lines of the records, in _RECORD_COLUMNS order
        # Per line: (seq, minute, blocked, bytes_in, bytes_out, errored, aborted, *top keys)
        self.facts: list[tuple[Any, ...]] = []
        self.last_time = 0.0
        self.quarantine: list[tuple[Any, ...]] = []
        self.result: IngestResult | None = None
        self.error: BaseException | None = None
        self.writer = 0


# text[] literals of the group lists seen lately, by their JSON text (a user's groups repeat).
_ARRAY_LITERALS: dict[str, str] = {}


def _array_literal(key: str, names: list[str]) -> str:
    """`{"a","b \\"c\\""}`: the text[] input form of `names`, escaped again for COPY text."""
    if len(_ARRAY_LITERALS) >= 4096:
        _ARRAY_LITERALS.clear()
    literal = _ARRAY_LITERALS[key] = (
        "{" + ",".join('"' + _clean_text(name).replace("\\", "\\\\").replace('"', '\\"') + '"' for name in names) + "}"
    ).translate(_ESCAPES)
    return literal


def _clean_text(value: Any) -> Any:
    """PostgreSQL text holds neither NUL nor lone surrogates (which JSON can carry)."""
    if isinstance(value, str):
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return value


# "YYYY-MM-DD HH:MM:" of the minutes seen lately: a batch's records fall in a few minutes, so
# a record's timestamptz text costs a dict lookup and two integer divisions.
_MINUTE_TEXT: dict[int, str] = {}
_EPOCH = dt.datetime(1970, 1, 1)


def _timestamp(when: float) -> str:
    """The COPY text of a timestamptz at `when` (epoch seconds), to the microsecond."""
    micros = round(when * 1_000_000)
    minute, rest = divmod(micros, 60_000_000)
    prefix = _MINUTE_TEXT.get(minute)
    if prefix is None:
        if len(_MINUTE_TEXT) >= 65536:
            _MINUTE_TEXT.clear()
        d = _EPOCH + dt.timedelta(minutes=minute)
        prefix = _MINUTE_TEXT[minute] = f"{d.year:04d}-{d.month:02d}-{d.day:02d} {d.hour:02d}:{d.minute:02d}:"
    seconds, fraction = divmod(rest, 1_000_000)
    return f"{prefix}{seconds:02d}.{fraction:06d}+00"


_N = "\\N"  # NULL in COPY text


def _generic_row(raw: bytes) -> tuple[Any, ...]:
    """`record_row` of one record the fast decoder declined, with this store's own bounds."""
    row = record_row(check_record(json.loads(raw)))
    status, bytes_in, bytes_out, when = row[8], row[9], row[10], row[0]
    if status is not None and not -_INT32 <= status < _INT32:
        raise MalformedRecord(f"'status' out of range: {status!r}")
    if bytes_in >= _INT64 or bytes_out >= _INT64:
        raise MalformedRecord("byte counts out of range")
    if not -62135596800.0 <= when < 253402300800.0:  # years 1 to 9999
        raise MalformedRecord(f"'ts' out of range: {when!r}")
    return row


def _prepare(node: str, segment: int, first_seq: int, records: list[bytes], received: float) -> _Batch:
    """Parse and check a batch outside any lock, into COPY lines and the facts the roll-ups count."""
    batch = _Batch((node, segment, first_seq, first_seq + len(records) - 1))
    loads = json.loads
    lines, facts, days = batch.lines, batch.facts, batch.days
    head = f"{_text(_clean_text(node))}\t{segment}\t"
    blocked_actions, error_actions = BLOCKED_ACTIONS, ERROR_ACTIONS
    last_day = None
    last_time = 0.0
    N = _N
    for seq, raw, row in zip(itertools.count(first_seq), records, fastrows.decode(records)):
        if row is None:  # not the proxy's usual shape: the generic checks store it or say why not
            try:
                row = _generic_row(raw)
            except MalformedRecord as e:
                batch.quarantine.append((node, segment, seq, received, str(e), bytes(raw)))
                continue
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                batch.quarantine.append((node, segment, seq, received, f"not JSON: {e}", bytes(raw)))
                continue
        (when, minute, client, user, method, url, host, host_rev, status, bytes_in, bytes_out,
         duration, action, rule, category, application, version, dlp, detail, transfer, tls,
         groups) = row
        if groups is not None:  # record_row checked the list and made its JSON text
            groups = _ARRAY_LITERALS.get(groups) or _array_literal(groups, loads(groups))
        if b"\\" in raw:
            # Escaped characters: maybe a NUL, a lone surrogate, a tab or a backslash; every text
            # is cleaned (for the database and the roll-up keys) and escaped for COPY. The plain
            # case below needs neither: JSON text without a backslash holds no control character.
            (client, user, method, url, host, host_rev, action, rule, category, application, transfer,
             tls) = (_clean_text(v) for v in (client, user, method, url, host, host_rev, action, rule,
                                                 category, application, transfer, tls))
            if dlp is not None:
                dlp = _clean_text(dlp).replace(_JSON_NUL, "")
            (client_text, user_text, method_text, url_text, host_text, host_rev_text, action_text, rule_text,
             category_text, application_text, transfer_text, tls_text) = (
                N if v is None else _text(v) for v in (client, user, method, url, host, host_rev, action, rule,
                                                       category, application, transfer, tls))
            version_text = N if version is None else _text(_clean_text(str(version)))
            detail_text = N if detail is None else _text(_clean_text(detail))
        else:
            client_text = N if client is None else client
            user_text = N if user is None else user
            method_text = N if method is None else method
            url_text = N if url is None else url
            host_text = N if host is None else host
            host_rev_text = N if host_rev is None else host_rev
            action_text = N if action is None else action
            rule_text = N if rule is None else rule
            category_text = N if category is None else category
            application_text = N if application is None else application
            transfer_text = transfer
            tls_text = N if tls is None else tls
            version_text = N if version is None else str(version)
            detail_text = N if detail is None else detail.translate(_ESCAPES)  # JSON of a dict: \u escapes
        lines.append(
            f"{head}{seq}\t{_timestamp(when)}\t{client_text}\t{user_text}\t{method_text}\t{url_text}\t{host_text}"
            f"\t{host_rev_text}"
            f"\t{N if status is None else status}\t{bytes_in}\t{bytes_out}\t{N if duration is None else _float(duration)}"
            f"\t{action_text}\t{rule_text}\t{category_text}\t{application_text}\t{version_text}"
            f"\t{N if dlp is None else dlp.translate(_ESCAPES)}\t{detail_text}\t{transfer_text}\t{tls_text}"
            f"\t{N if groups is None else groups}\n"
        )
        facts.append((
            seq, minute * 60, 1 if action in blocked_actions else 0, bytes_in, bytes_out,
            1 if action in error_actions else 0, 1 if transfer == CLIENT_ABORTED else 0, host, user, category, application, rule,
        ))
        if when > last_time:
            last_time = when
        day = int(when // 86400)
        if day != last_day:
            days.add(day)
            last_day = day
    batch.last_time = last_time or received
    return batch


def _float(value: float) -> str:
    text = repr(value)
    return text if math.isfinite(value) else {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[text]


_Totals = dict[tuple[int, str], list[int]]
# Top counts by (dimension, hour), then by key: a record adds to five small tables found once per
# hour, with its keys as they are (no tuple built per record and dimension), and each table
# turns into upsert columns with list operations.
_Tops = dict[tuple[str, int], dict[str, list[int]]]
_TOP_KEYS = ("domain", "user", "category", "application", "rule")  # positions 7.. of a fact


def _count(node: str, facts: Iterable[tuple[Any, ...]], minutes: _Totals, tops: _Tops) -> None:
    """Add the records of `facts` (of `node`) to the minute totals and the hourly top counts."""
    hour = None
    tables: list[dict[str, list[int]]] = []
    for _seq, minute, blocked, bytes_in, bytes_out, errored, aborted, *keys in facts:
        totals = minutes.get((minute, node))
        if totals is None:
            minutes[(minute, node)] = [1, blocked, bytes_in, bytes_out, errored, aborted]
        else:
            totals[0] += 1
            totals[1] += blocked
            totals[2] += bytes_in
            totals[3] += bytes_out
            totals[4] += errored
            totals[5] += aborted
        if minute - minute % 3600 != hour:
            hour = minute - minute % 3600
            tables = [tops.setdefault((dimension, hour), {}) for dimension in _TOP_KEYS]
        size = bytes_in + bytes_out
        for table, key in zip(tables, keys):
            if key is None:
                continue
            top = table.get(key)
            if top is None:
                table[key] = [1, blocked, size]
            else:
                top[0] += 1
                top[1] += blocked
                top[2] += size


def _tops_by_day(tops: _Tops) -> _Tops:
    """The same counts per (dimension, UTC day). A commit's records usually fall in one hour: its
    tables are then used as they are (read only)."""
    out: _Tops = {}
    merged: set[tuple[str, int]] = set()
    for (dimension, hour), table in tops.items():
        day = (dimension, hour - hour % 86400)
        have = out.get(day)
        if have is None:
            out[day] = table
            continue
        if day not in merged:  # a second hour of the day: sum into a table of its own
            have = out[day] = {key: list(values) for key, values in have.items()}
            merged.add(day)
        for key, (requests, blocked, size) in table.items():
            top = have.get(key)
            if top is None:
                have[key] = [requests, blocked, size]
            else:
                top[0] += requests
                top[1] += blocked
                top[2] += size
    return out


def _top_columns(tops: _Tops) -> list[str]:
    """The upsert's columns (dimension, bucket, key, requests, blocked, bytes) as array literals."""
    dimensions: list[str] = []
    buckets: list[int] = []
    keys: list[str] = []
    counts: list[tuple[int, int, int]] = []
    for (dimension, bucket), table in tops.items():
        if table:
            dimensions += [dimension] * len(table)
            buckets += [bucket] * len(table)
            keys += table
            counts += table.values()
    requests, blocked, sizes = zip(*counts) if counts else ((), (), ())
    return [_text_array(dimensions), _int_array(buckets), _text_array(keys), _int_array(requests),
            _int_array(blocked), _int_array(sizes)]


def _coarser(counts: dict[tuple[Any, ...], list[int]], at: int, span: int) -> dict[tuple[Any, ...], list[int]]:
    """The same counts with the bucket at position `at` of each key truncated to `span` seconds."""
    out: dict[tuple[Any, ...], list[int]] = {}
    for key, values in counts.items():
        bucket = key[at]
        wider = (*key[:at], bucket - bucket % span, *key[at + 1 :])
        summed = out.get(wider)
        if summed is None:
            out[wider] = list(values)
        else:
            for i, value in enumerate(values):
                summed[i] += value
    return out


def _int_array(values: Iterable[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _text_array(values: Iterable[str]) -> str:
    """The array input form of `values` (psycopg's list adapter costs a Python call per element;
    this one string is parsed by the server)."""
    values = list(values)
    if not values:
        return "{}"
    joined = '","'.join(values)
    if "\\" not in joined and '"' not in joined:  # the usual case: nothing to escape, one join
        return '{"' + joined + '"}'
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def _columns(counts: dict[tuple[Any, ...], list[int]], texts: tuple[int, ...]) -> list[str]:
    """Rows of key + values as one array literal per column (for unnest); the columns at the
    positions `texts` hold text, the others integers."""
    rows = list(counts.items())
    width = len(rows[0][0]) + len(rows[0][1]) if rows else 0
    columns = [list(column) for column in zip(*((*key, *values) for key, values in rows))]
    return [(_text_array if i in texts else _int_array)(columns[i]) for i in range(width)]


def _run_columns(runs: list[tuple[str, int, int, int, float]]) -> list[str]:
    nodes, segments, firsts, lasts, times = zip(*runs)
    return [_text_array(nodes), _int_array(segments), _int_array(firsts), _int_array(lasts),
            "{" + ",".join(map(repr, times)) + "}"]


def _lock_key(node: str, segment: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{node}\0{segment}".encode("utf-8", "replace"), digest_size=8).digest(),
                          "big", signed=True)


class _WholeNumbers(Loader):
    """numeric -> int when whole (sums of bigint columns), else float: like SQLite's sum()."""

    def load(self, data: Any) -> Any:
        value = Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


def _configure(conn: psycopg.Connection, timeout_ms: int | None = None) -> None:
    conn.adapters.register_loader("numeric", _WholeNumbers)
    conn.execute(f"SET statement_timeout = {int(timeout_ms or READ_TIMEOUT_MS)}")


_PLACEHOLDER = re.compile(r"\?(\d*)")


def _translate(sql: str, params: Iterable[Any]) -> tuple[str, list[Any]]:
    """sqlite3 placeholders (`?`, `?N`) -> psycopg's `%s`, with the parameters in order."""
    params = list(params)
    ordered: list[Any] = []
    largest = 0  # as in SQLite, a bare ? is numbered one more than the largest number so far

    def replace(match: re.Match[str]) -> str:
        nonlocal largest
        number = int(match.group(1)) if match.group(1) else largest + 1
        largest = max(largest, number)
        ordered.append(params[number - 1])
        return "%s"

    return _PLACEHOLDER.sub(replace, sql.replace("%", "%%")), ordered


class _Rows:
    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._rows)

    def __iter__(self):
        return iter(self._rows)


class _Reader:
    """A sqlite3-like `execute` over the read pool (for `reporting.aggregate`)."""

    def __init__(self, store: "PostgresReportStore") -> None:
        self._store = store

    def execute(self, sql: str, params: Iterable[Any] = ()) -> _Rows:
        sql, ordered = _translate(sql, params)
        with self._store._read() as conn:
            cur = conn.execute(sql, ordered)
            rows = cur.fetchall() if cur.description is not None else []
            return _Rows(rows, cur.rowcount)


class PostgresReportStore:
    """Access records of every node, their roll-ups, quarantined records and drop counters."""

    backend = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        read_url: str | None = None,
        password: str | None = None,
        wall_clock: Callable[[], float] = time.time,
        pool_size: int = 4,
        connect_timeout: int = CONNECT_TIMEOUT,
        writers: int = 2,
    ) -> None:
        self.url = url
        self.read_url = read_url or url
        # Bumped by every commit of records and by retention; distinct between store objects.
        self.generation = next(_STORES) << 40
        self._kwargs: dict[str, Any] = {
            "connect_timeout": connect_timeout, "application_name": "safesquid-tw", **_KEEPALIVES}
        if password is not None:
            self._kwargs["password"] = password
        self._wall_clock = wall_clock
        # Each writer has its own connection (its own server process and core); a node's
        # batches always go to the same writer, so writers never wait on each other's roll-up
        # rows, nor race on a record's name.
        self._writers = [_Writer() for _ in range(max(1, writers))]
        self._days_lock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._days: set[int] = set()
        # Per node: the latest hour its records reached, and its earlier hours whose top counts
        # are to be counted (again) from the records (see `_node_hours`). A node is always
        # served by the same writer, under whose lock its entries change.
        self._node_latest: dict[str, int] = {}
        self._node_refill: dict[str, set[int]] = {}
        self._ready = False  # schema checked and upgraded on this run
        with self._write_lock:
            try:
                self._connection()  # SchemaTooNew stops the master here, at start
            except (StoreUnavailable, psycopg.OperationalError):
                pass  # down at start: ingest waits (slaves keep spooling) until it answers
        self._pool = ConnectionPool(
            self.read_url,
            min_size=1,
            max_size=pool_size,
            kwargs={**self._kwargs, "autocommit": True},
            configure=_configure,
            check=ConnectionPool.check_connection,
            timeout=connect_timeout,
            reconnect_timeout=0,
            open=False,
            name="report-reads",
        )
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close()
        for writer in self._writers:
            with writer.lock:
                if writer.conn is not None:
                    writer.conn.close()
                    writer.conn = None

    # The first writer's lock, queue and connection, for maintenance (prune, migration, tests).
    @property
    def _write_lock(self) -> threading.Lock:
        return self._writers[0].lock

    @property
    def _queue(self) -> list[_Batch]:
        return self._writers[0].queue

    # -- connections ----------------------------------------------------------------------------

    def _connection(self, writer: "_Writer | None" = None) -> psycopg.Connection:
        """A writer's connection (call under its lock), reconnected after a failure."""
        writer = writer or self._writers[0]
        if writer.conn is not None and not writer.conn.closed:
            return writer.conn
        if time.monotonic() - writer.failed_at < RETRY_CONNECT_AFTER:
            raise StoreUnavailable("the report database was unreachable moments ago")
        try:
            conn = psycopg.connect(self.url, autocommit=True, **self._kwargs)
        except psycopg.OperationalError as e:
            writer.failed_at = time.monotonic()
            raise StoreUnavailable(f"cannot reach the report database: {_first_line(e)}") from None
        try:
            _configure(conn, WRITE_TIMEOUT_MS)
            with self._schema_lock:
                if not self._ready:
                    pgschema.migrate(conn)
                    with self._days_lock:
                        self._days = pgschema.partitioned_days(conn)
                    self._ready = True
            self._ensure_days(conn, self._days_ahead())
        except BaseException:
            conn.close()
            raise
        writer.conn = conn
        return conn

    def _broken(self, error: BaseException, writer: "_Writer | None" = None) -> BaseException:
        """After an error: drop a dead writer connection; name unavailability as such."""
        writer = writer or self._writers[0]
        if writer.conn is not None and (writer.conn.closed or writer.conn.broken):
            writer.conn.close()
            writer.conn = None
            writer.failed_at = time.monotonic()
        if isinstance(error, _UNAVAILABLE):
            return StoreUnavailable(f"the report database failed: {_first_line(error)}")
        return error

    @contextlib.contextmanager
    def _read(self) -> Iterator[psycopg.Connection]:
        """A connection of the read pool; an unreachable database is StoreUnavailable."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except (*_UNAVAILABLE, PoolTimeout) as e:
            raise StoreUnavailable(f"cannot read the report database: {_first_line(e)}") from None

    def reader(self) -> _Reader:
        """A sqlite3-like handle for read-only queries (roll-ups, counts)."""
        return _Reader(self)

    def available(self) -> bool:
        try:
            self.reader().execute("SELECT 1")
            return True
        except StoreUnavailable:
            return False

    # -- writing --------------------------------------------------------------------------------

    def ingest(self, node: str, segment: int, first_seq: int, records: list[bytes]) -> IngestResult:
        """Store a batch (record i is (node, segment, first_seq + i)) all or nothing, durably.

        Blocks on the network: call it in a worker thread. Concurrent calls share commits.
        """
        batch = _prepare(node, segment, first_seq, records, self._wall_clock())
        batch.writer = self._writer_of(node)
        writer = self._writers[batch.writer]
        with writer.queue_lock:
            writer.queue.append(batch)
        with writer.lock:
            if batch.result is None and batch.error is None:  # nobody took it along: lead
                with writer.queue_lock:
                    group, writer.queue = writer.queue, []
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
        for index, writer in enumerate(self._writers):
            group = [b for b in prepared if self._writer_of(b.key[0]) == index]
            for batch in group:
                batch.writer = index
            if group:
                with writer.lock:
                    self._commit(group, leader=None)
        return [b.error if b.error is not None else b.result for b in prepared]  # type: ignore[misc]

    def _days_ahead(self) -> set[int]:
        today = pgschema.day_of(self._wall_clock())
        return {today - 1, today, today + 1, today + 2}

    def _writer_of(self, node: str) -> int:
        return zlib.crc32(node.encode("utf-8", "replace")) % len(self._writers)

    def _ensure_days(self, conn: psycopg.Connection, days: set[int]) -> None:
        with self._days_lock:
            missing = pgschema.wanted_days(days, self._wall_clock()) - self._days
            for day in sorted(missing):
                with conn.transaction():
                    pgschema.create_day(conn, day)
                self._days.add(day)

    def _commit(self, group: list[_Batch], leader: _Batch | None) -> None:
        writer = self._writers[group[0].writer]
        members: list[_Batch] = []
        try:
            conn = self._connection(writer)
            days: set[int] = set()
            for batch in group:
                days |= batch.days
            if not days <= self._days:
                self._ensure_days(conn, days)
            # One statement per (node, segment) and commit: its counts are told apart by them.
            rounds: list[list[_Batch]] = []
            for batch in group:
                for members in rounds:
                    if all(m.key[:2] != batch.key[:2] for m in members):
                        members.append(batch)
                        break
                else:
                    rounds.append([batch])
            for members in rounds:
                try:
                    with conn.transaction():
                        self._store(conn, members)
                    self.generation += 1  # after the commit (aggregate's memo of one node's top lists)
                except _UNAVAILABLE:
                    raise
                except Exception as e:
                    for batch in members:
                        batch.result = None  # rolled back
                    if len(members) == 1:
                        members[0].error = e
                        continue
                    for batch in members:  # find the failing batch: store the others alone
                        try:
                            with conn.transaction():
                                self._store(conn, [batch])
                            self.generation += 1
                        except _UNAVAILABLE:
                            raise
                        except Exception as e:
                            batch.result, batch.error = None, e
        except BaseException as e:
            # The connection failed: what was not committed before is unknown or lost; every
            # batch without a result fails (its slave ships it again; names make that safe).
            error = self._broken(e, writer)
            failed = [batch for batch in group if batch.result is None or batch in members]
            for batch in failed:
                batch.result = None
                batch.error = error if batch is leader else copy.copy(error)
            if leader is None:
                raise error from None

    def _store(self, conn: psycopg.Connection, batches: list[_Batch]) -> None:
        """Store what is new of `batches` (distinct (node, segment) each) in the caller's
        transaction: look up the runs of names already stored, COPY the new records, note their
        names in the ledger, quarantine the refused ones and count them into the roll-ups."""
        conn.execute(_LOCK_NAMES, (_int_array(sorted({_lock_key(*b.key[:2]) for b in batches})),))
        names = [_text_array(b.key[0] for b in batches), _int_array(b.key[1] for b in batches),
                 _int_array(b.key[2] for b in batches), _int_array(b.key[3] for b in batches)]
        stored: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for node, segment, first, last in conn.execute(_STORED_RUNS, names):
            stored.setdefault((node, segment), []).append((first, last))
        minutes: _Totals = {}
        tops: _Tops = {}
        runs: list[tuple[str, int, int, int, float]] = []
        lines: list[str] = []
        counts: list[tuple[int, list[tuple[Any, ...]]]] = []  # per batch: records kept, quarantine entries
        for batch in batches:
            node, segment, first_seq, last_seq = batch.key
            if last_seq < first_seq:  # an empty batch: nothing to store or to note
                counts.append((0, []))
                continue
            seen = stored.get((node, segment))
            if not seen:
                lines += batch.lines
                _count(node, batch.facts, minutes, tops)
                runs.append((node, segment, first_seq, last_seq, batch.last_time))
                counts.append((len(batch.lines), batch.quarantine))
                continue
            # Re-shipped, in whole or in part: only the names outside the stored runs go in.
            def new(seq: int, seen: list[tuple[int, int]] = seen) -> bool:
                return not any(first <= seq <= last for first, last in seen)

            kept = [i for i, fact in enumerate(batch.facts) if new(fact[0])]
            lines += [batch.lines[i] for i in kept]
            facts = [batch.facts[i] for i in kept]
            _count(node, facts, minutes, tops)
            entries = [entry for entry in batch.quarantine if new(entry[2])]
            run_start = None
            for seq in range(first_seq, last_seq + 2):
                if seq <= last_seq and new(seq):
                    if run_start is None:
                        run_start = seq
                elif run_start is not None:
                    runs.append((node, segment, run_start, seq - 1, batch.last_time))
                    run_start = None
            counts.append((len(kept), entries))
        if lines:
            with conn.cursor().copy(_COPY_RECORDS) as cp:
                cp.write("".join(lines))
        quarantined: list[int] = []
        for _kept, entries in counts:  # (already quarantined by a migration: counted as duplicates)
            quarantined.append(sum(conn.execute(_INSERT_QUARANTINE, entry).rowcount for entry in entries))
        if runs:
            conn.execute(_INSERT_RUNS, _run_columns(runs))
        if minutes:
            conn.execute(_UPSERT_MINUTE, _columns(minutes, (1,)))
            conn.execute(_UPSERT_HOUR, _columns(_coarser(minutes, 0, 3600), (1,)))
        if any(tops.values()):
            conn.execute(_UPSERT_TOP_HOUR, _top_columns(tops))
            conn.execute(_UPSERT_TOP_DAY, _top_columns(_tops_by_day(tops)))
        touched: dict[str, set[int]] = {}
        for minute, node in minutes:
            touched.setdefault(node, set()).add(minute - minute % 3600)
        if touched:
            self._node_hours(conn, touched)
        for batch, (kept, _entries), done in zip(batches, counts, quarantined):
            total = len(batch.lines) + len(batch.quarantine)
            batch.result = IngestResult(kept, total - kept - done, done)

    def _node_hours(self, conn: psycopg.Connection, touched: dict[str, set[int]]) -> None:
        """Keep `rollup_top_node_hour` right for the (node, hour)s this commit stored records in,
        and count one closed hour of one of these nodes into it (in the caller's transaction).

        An hour of a node is counted once the node's records have reached a later hour; records
        that arrive afterwards for a counted hour unname it here (DELETE ... RETURNING), so a
        reader counts it from the records until it is counted again. In-memory notes (which
        hours wait) are only hints: a lost note leaves an hour uncounted, read from the records,
        never wrong."""
        nodes = sorted(touched)
        flat = [(node, hour) for node in nodes for hour in sorted(touched[node])]
        unnamed = conn.execute(
            "DELETE FROM rollup_top_node_filled f USING unnest(%s::text[], %s::bigint[]) AS t(node, bucket)"
            " WHERE f.node = t.node AND f.bucket = t.bucket RETURNING f.node, f.bucket",
            (_text_array(n for n, _h in flat), _int_array(h for _n, h in flat))).fetchall()
        if unnamed:
            conn.execute(
                "DELETE FROM rollup_top_node_hour r USING unnest(%s::text[], %s::bigint[]) AS t(node, bucket)"
                " WHERE r.node = t.node AND r.bucket = t.bucket",
                (_text_array(n for n, _h in unnamed), _int_array(h for _n, h in unnamed)))
        for node, hour in unnamed:
            self._node_refill.setdefault(node, set()).add(hour)
        for node in nodes:
            latest = max(touched[node])
            known = self._node_latest.get(node)
            refill = self._node_refill.setdefault(node, set())
            if known is None:  # first commit of this node since start: its last day, where not counted
                counted = {b for (b,) in conn.execute(
                    "SELECT bucket FROM rollup_top_node_filled WHERE node = %s AND bucket >= %s",
                    (node, latest - 86400))}
                refill.update(h for h in range(latest - 86400 + 3600, latest, 3600) if h not in counted)
            elif latest > known:
                refill.add(known)  # the hour this node has just left
            if known is None or latest > known:
                self._node_latest[node] = known = latest
        for node in nodes:  # at most one hour per commit: a GROUP BY of one hour of one node
            waiting = [h for h in self._node_refill.get(node, ()) if h < self._node_latest[node]]
            if waiting:
                hour = max(waiting)
                conn.execute("DELETE FROM rollup_top_node_hour WHERE node = %s AND bucket = %s", (node, hour))
                conn.execute(_FILL_NODE_HOUR, {"node": node, "hour": hour})
                conn.execute("INSERT INTO rollup_top_node_filled (node, bucket) VALUES (%s, %s)"
                             " ON CONFLICT DO NOTHING", (node, hour))
                self._node_refill[node].discard(hour)
                break

    def record_dropped(self, node: str, total_dropped: int) -> None:
        """A node's running total of records its spool dropped at its size cap (the larger of
        the stored and reported totals wins: a late message cannot lower it)."""
        self._write(
            "INSERT INTO node_drops (node, total_dropped, reported) VALUES (%s, %s, %s)"
            " ON CONFLICT (node) DO UPDATE SET reported = excluded.reported,"
            " total_dropped = greatest(node_drops.total_dropped, excluded.total_dropped)",
            (node, int(total_dropped), self._wall_clock()),
        )

    def _write(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> int:
        with self._write_lock:
            try:
                return self._connection().execute(sql, params).rowcount
            except Exception as e:
                raise self._broken(e) from None

    def prune(self, older_than: float, batch: int = 0, *, reclaim: bool = True) -> int:
        """Take out the day partitions that end by `older_than`, delete older records of the day
        it falls in, roll-up buckets that end by then and quarantined records received before
        then; create the partitions of the coming days. Returns the records removed.
        (`batch` is accepted for the SQLite store's signature: a partition goes at once.)

        A day's partitions are detached (a short transaction: ingest and reports wait only for
        it), then dropped by `reclaim_space` after the writer's lock is released (its commit
        unlinks the day's files, gigabytes, which takes about a second on a busy disk and blocks
        nobody). With `reclaim=False` they wait for the next call of either."""
        cutoff_day = pgschema.day_of(older_than)
        with self._write_lock:
            try:
                conn = self._connection()
                self._ensure_days(conn, self._days_ahead())
                removed = 0
                for day in sorted(d for d in pgschema.partitioned_days(conn) if d < cutoff_day):
                    with conn.transaction():
                        # The day's records as its hour roll-up counted them at ingest (the same
                        # number as counting the partition, without reading millions of rows).
                        removed += conn.execute(
                            "SELECT coalesce(sum(requests), 0) FROM rollup_hour WHERE bucket >= %s AND bucket < %s",
                            (day * pgschema.DAY, (day + 1) * pgschema.DAY)).fetchone()[0]
                        pgschema.retire_day(conn, day)
                    self._days.discard(day)
                with conn.transaction():
                    removed += conn.execute(
                        "DELETE FROM requests WHERE time < to_timestamp(%s)", (older_than,)
                    ).rowcount
                    conn.execute("DELETE FROM quarantine WHERE received < %s", (older_than,))
                    for table, span in (("rollup_minute", 60), ("rollup_hour", 3600), ("rollup_top_hour", 3600)):
                        conn.execute(f"DELETE FROM {table} WHERE bucket <= %s", (older_than - span,))
                    # One node's hours that lost records (the whole hour, or the part before a
                    # cut inside it) are counted from what is left of them when next asked.
                    # (whole days went with their partitions: only the cut's own day is left)
                    conn.execute("DELETE FROM rollup_top_node_filled WHERE bucket < %s", (older_than,))
                    conn.execute("DELETE FROM rollup_top_node_hour WHERE bucket >= %s AND bucket < %s",
                                 (cutoff_day * pgschema.DAY, older_than))
                    # Names of records all older than the cut: a shipment of them again would be
                    # stored again, as it would have been with the records' own unique key.
                    conn.execute("DELETE FROM ingest_ledger WHERE last_time < %s", (older_than,))
                    self.generation += 1
                    recount_after_prune(lambda sql, params: conn.execute(*_translate(sql, params)), older_than)
            except Exception as e:
                raise self._broken(e) from None
        if reclaim:
            self.reclaim_space()
        return removed

    def reclaim_space(self) -> int:
        """Drop the day partitions retention has detached (their files go back to the disk);
        returns how many tables. Each DROP is its own transaction on a connection of its own, so
        neither ingest nor reports wait for it."""
        try:
            with psycopg.connect(self.url, autocommit=True, **self._kwargs) as conn:
                conn.execute(f"SET statement_timeout = {WRITE_TIMEOUT_MS}")
                return pgschema.drop_retired(conn)
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"the report database failed: {_first_line(e)}") from None

    # -- reading --------------------------------------------------------------------------------

    def _query(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read() as conn:
            return conn.execute(sql, params).fetchall()

    def count(self, **filters: Any) -> int:
        """Records matching the filters of `search` (all optional).

        A long period filtered by node at most (the search page's page count) is counted from
        the minute roll-ups for its whole minutes and from the records only at its two ends:
        the same number, without reading millions of rows."""
        where, params = _where(filters)
        given = {key for key, value in filters.items() if value is not None}
        if {"start", "end"} <= given <= {"start", "end", "node"}:
            start, end = float(filters["start"]), float(filters["end"])
            first, last = math.ceil(start / 60) * 60, math.floor(end / 60) * 60
            if last - first >= 3600:
                node = filters.get("node")
                node_clause, node_params = (" AND node = %s", [node]) if node is not None else ("", [])
                return self._query(
                    "SELECT (SELECT coalesce(sum(requests), 0) FROM rollup_minute WHERE bucket >= %s AND bucket < %s"
                    f"{node_clause}) + (SELECT count(*) FROM requests WHERE ((time >= to_timestamp(%s) AND"
                    " time < to_timestamp(%s)) OR (time >= to_timestamp(%s) AND time < to_timestamp(%s)))"
                    f"{node_clause})",
                    [first, last, *node_params, start, first, last, end, *node_params],
                )[0][0]
        return self._query(f"SELECT count(*) FROM requests{where}", params)[0][0]

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

        `domain` matches that host and its subdomains; `tls` "none" matches records without TLS;
        the others match exactly.
        """
        filters = {
            "start": start, "end": end, "node": node, "user": user, "client": client,
            "domain": domain, "rule": rule, "status": status, "action": action, "category": category,
            "transfer": transfer, "tls": tls,
        }  # fmt: skip
        where, params = _where(filters)
        limit, offset = int(limit), int(offset)
        if any(filters[key] is not None for key in _ORDERED_BY_INDEX):
            rows = self._query(
                f"SELECT {_SELECT} FROM requests{where} ORDER BY time DESC, node, segment DESC, seq DESC"
                " LIMIT %s OFFSET %s",
                [*params, limit, offset],
            )
        elif all(filters[key] is None for key in _FILTERS - {"start", "end"}):
            rows = self._newest_of_every_node(where, params, float(start), float(end), limit, offset)
        else:
            rows = self._newest_in_windows(filters, float(start), float(end), limit, offset)
        found = []
        for row in rows:
            record = dict(zip(_COLUMNS, row))
            record["dlp"] = record["dlp"] or []
            record["groups"] = record["groups"] or []
            version = record["policy_version"]
            if version is not None and version.lstrip("-").isdigit():
                record["policy_version"] = int(version)
            found.append(record)
        return found

    def _newest_of_every_node(self, where: str, params: list[Any], start: float, end: float, limit: int,
                              offset: int) -> list[tuple[Any, ...]]:
        """The newest matching records of the period when no filter has an index that keeps
        time order: the newest `limit + offset` of each node (index (node, time), read backwards,
        at most that many rows each), merged. The nodes with records in the period are those of
        its hourly roll-up, which is committed with the records."""
        nodes = [node for (node,) in self._query(
            "SELECT DISTINCT node FROM rollup_hour WHERE bucket >= %s AND bucket < %s",
            [start // 3600 * 3600, end])]
        if not nodes:
            return []
        branch = (f"(SELECT {_SELECT}, time AS order_time FROM requests{where} AND node = %s"
                  " ORDER BY time DESC, segment DESC, seq DESC LIMIT %s)")
        sql = ("SELECT * FROM (" + " UNION ALL ".join([branch] * len(nodes))
               + ") AS newest ORDER BY order_time DESC, node, segment DESC, seq DESC LIMIT %s OFFSET %s")
        values: list[Any] = []
        for node in sorted(nodes):
            values += [*params, node, limit + offset]
        return [row[:-1] for row in self._query(sql, [*values, limit, offset])]

    def _newest_in_windows(self, filters: dict[str, Any], start: float, end: float, limit: int,
                           offset: int) -> list[tuple[Any, ...]]:
        """The newest matching records of the period when the filters have no index of their own
        (status, action, category, transfer, tls): the latest 10 minutes of the period first,
        then 6 times as long each time, until a window holds `limit + offset` of them or covers
        the whole period. Each window is read through the time index (BRIN) in one pass: a
        common value is found in the first window, a rare one costs about one pass over the
        period, as a scan of it would."""
        span = 600.0
        while True:
            low = max(start, end - span)
            where, params = _where({**filters, "start": low, "end": end})
            rows = self._query(
                f"SELECT {_SELECT} FROM requests{where} ORDER BY time DESC, node, segment DESC, seq DESC"
                " LIMIT %s OFFSET %s", [*params, limit, offset])
            if low <= start or len(rows) == limit:
                return rows
            span *= 6

    def quarantined(self, *, node: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Records that could not be stored, newest first, with the reason and the raw bytes."""
        sql = "SELECT node, segment, seq, received, reason, raw FROM quarantine"
        params: list[Any] = []
        if node is not None:
            sql, params = sql + " WHERE node = %s", [node]
        rows = self._query(sql + " ORDER BY received DESC LIMIT %s", [*params, limit])
        keys = ("node", "segment", "seq", "received", "reason", "raw")
        return [dict(zip(keys, row)) for row in rows]

    def dropped_totals(self) -> dict[str, int]:
        """Per node, the records its spool dropped at the cap (as last reported)."""
        return dict(self._query("SELECT node, total_dropped FROM node_drops ORDER BY node"))


def _clean(value: Any) -> Any:
    return value.replace("\x00", "") if isinstance(value, str) else value


def _first_line(error: BaseException | None) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    unknown = set(filters) - _FILTERS
    if unknown:
        raise TypeError(f"unknown record filters: {', '.join(sorted(unknown))}")
    clauses: list[str] = []
    params: list[Any] = []
    start, end = filters.get("start"), filters.get("end")
    if start is not None:
        clauses.append("time >= to_timestamp(%s)")
        params.append(float(start))
    if end is not None:
        clauses.append("time < to_timestamp(%s)")
        params.append(float(end))
    for key in ("node", "client", "rule", "status", "action", "category"):
        if filters.get(key) is not None:
            clauses.append(f"{key} = %s")
            params.append(filters[key])
    if filters.get("user") is not None:
        clauses.append('"user" = %s')
        params.append(filters["user"])
    transfer = filters.get("transfer")
    if transfer is not None:
        # Records stored before the key existed have none: they were complete as far as anyone knew.
        clauses.append("coalesce(transfer, 'complete') = %s")
        params.append(transfer)
    tls = filters.get("tls")
    if tls is not None:
        if tls == "none":
            clauses.append("tls IS NULL")
        else:
            clauses.append("tls = %s")
            params.append(tls)
    domain = filters.get("domain")
    if domain is not None:
        reversed_domain = domain.lower().rstrip(".")[::-1]
        # host_rev is collated "C": [d, d + "/") is one index range holding d and d + "." + ...
        clauses.append("host_rev >= %s AND host_rev < %s AND (host_rev = %s OR substr(host_rev, %s, 1) = '.')")
        params += [reversed_domain, reversed_domain + "/", reversed_domain, len(reversed_domain) + 1]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


__all__ = ["PostgresReportStore", "StoreUnavailable"]
