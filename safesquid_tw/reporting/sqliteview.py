"""The `access_records` view of the SQLite report store: the same stable interface as in
PostgreSQL (columns named after the access record's keys, plus `host`), for administrators' own
SQL. SQLite has no timestamp type: `time` is ISO 8601 UTC text and `ts` epoch seconds; `dlp` is
a JSON array.

The view is made again at every start from the columns the table has, so that columns added by
later schema versions (`transfer`, `tls`) appear in it as soon as they exist, NULL before.
"""

from __future__ import annotations

import sqlite3

_OPTIONAL = ("transfer", "tls")


def create_view(conn: sqlite3.Connection) -> None:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    optional = ", ".join(f"{name}" if name in columns else f"NULL AS {name}" for name in _OPTIONAL)
    conn.executescript(
        "DROP VIEW IF EXISTS access_records;"
        " CREATE VIEW access_records AS SELECT"
        " strftime('%Y-%m-%dT%H:%M:%fZ', time, 'unixepoch') AS time, time AS ts, node, client, user,"
        " method, url, host, status, bytes_in, bytes_out, duration_ms, action, rule, category,"
        f" application, policy_version, coalesce(dlp, '[]') AS dlp, detail, {optional}, segment, seq"
        " FROM requests;"
    )


__all__ = ["create_view"]
