"""The `access_records` view of the SQLite report store: the same stable interface as in
PostgreSQL (columns named after the access record's keys, plus `host`, `ts`, `segment` and
`seq`), for administrators' own SQL. SQLite has no timestamp, address or array types: `time` is
ISO 8601 UTC text and `ts` epoch seconds, `client` text, `dlp` and `groups` JSON arrays (`[]` when
empty); `transfer` reads "complete" for records stored before the key existed.

The store drops the view before it changes its tables and makes it again after, from the
columns the table has by then (SQLite refuses to alter a table under a view that names its
columns). `ACCESS_RECORD_COLUMNS` is the view's column order, the same in both stores: columns
added later go at the end, so views that administrators build on it keep working.
"""

from __future__ import annotations

import sqlite3

ACCESS_RECORD_COLUMNS = (
    "time", "ts", "node", "client", "user", "method", "url", "host", "status", "bytes_in", "bytes_out",
    "duration_ms", "action", "rule", "category", "application", "policy_version", "dlp", "detail",
    "transfer", "tls", "segment", "seq", "groups",
)  # fmt: skip

# How each column of the view reads the `requests` table (the others by their own name).
_EXPRESSIONS = {
    "time": "strftime('%Y-%m-%dT%H:%M:%fZ', time, 'unixepoch')",
    "ts": "time",
    "dlp": "coalesce(dlp, '[]')",
    "transfer": "coalesce(transfer, 'complete')",
    "groups": "coalesce(groups, '[]')",
}


def drop_view(conn: sqlite3.Connection) -> None:
    conn.execute("DROP VIEW IF EXISTS access_records")


def create_view(conn: sqlite3.Connection) -> None:
    """(Re)create the view; the table must already have every column (see `_ADDED_COLUMNS`)."""
    columns = ", ".join(
        f"{_EXPRESSIONS[name]} AS {name}" if name in _EXPRESSIONS else name for name in ACCESS_RECORD_COLUMNS
    )
    conn.execute("DROP VIEW IF EXISTS access_records")
    conn.execute(f"CREATE VIEW access_records AS SELECT {columns} FROM requests")


__all__ = ["ACCESS_RECORD_COLUMNS", "create_view", "drop_view"]
