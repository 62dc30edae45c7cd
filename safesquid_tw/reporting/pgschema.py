"""The PostgreSQL report store's schema: versioned migrations and day partitions.

`migrate(conn)` brings a database to `SCHEMA_VERSION` inside one transaction: an empty database
gets every step, an older schema the steps it lacks (a newer master upgrades in place), and a
schema newer than this code is refused with `SchemaTooNew` (an older master must not write into
tables whose meaning it does not know).

Records live in `requests`, range-partitioned by day on `time` (UTC days). Partitions are created
ahead of the records (`ensure_days`); a record whose day is far from now (a clock off by years)
lands in the default partition rather than creating one table per stray day. Retention drops
whole day partitions. Exactly-once is kept by `ingest_ledger`, the runs of record names
(node, segment, seq) already stored (version 4; before it, a unique key on every record).

The view `access_records` is the stable interface for administrators' own SQL and Grafana: its
columns are the access record's keys, with `time` as timestamptz, `client` as inet, `dlp` and
`groups` as text[], plus `host` (and `ts`, `segment`, `seq`), in the order of
`sqliteview.ACCESS_RECORD_COLUMNS`; a later version adds columns at its end only.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable

SCHEMA_VERSION = 6
DAY = 86400
# Days kept as real partitions around now; anything further goes to the default partition.
PAST_DAYS_PARTITIONED = 800
FUTURE_DAYS_PARTITIONED = 7


class SchemaTooNew(RuntimeError):
    """The database was written by a newer version of the gateway."""


_V1 = """
CREATE TABLE requests (
    node text NOT NULL, segment bigint NOT NULL, seq bigint NOT NULL,
    time timestamptz NOT NULL, client text, "user" text, method text, url text,
    host text, host_rev text COLLATE "C", status integer, bytes_in bigint NOT NULL, bytes_out bigint NOT NULL,
    duration_ms double precision, action text, rule text, category text, application text,
    policy_version text, dlp jsonb, detail text, transfer text, tls text,
    UNIQUE (node, segment, seq, time)
) PARTITION BY RANGE (time);
CREATE TABLE requests_other PARTITION OF requests DEFAULT;
CREATE INDEX requests_time ON requests (time);
CREATE INDEX requests_user ON requests ("user", time) WHERE "user" IS NOT NULL;
CREATE INDEX requests_client ON requests (client, time);
CREATE INDEX requests_host ON requests (host_rev, time) WHERE host_rev IS NOT NULL;
CREATE INDEX requests_rule ON requests (rule, time) WHERE rule IS NOT NULL;
CREATE TABLE quarantine (
    node text NOT NULL, segment bigint NOT NULL, seq bigint NOT NULL,
    received double precision NOT NULL, reason text NOT NULL, raw bytea NOT NULL,
    PRIMARY KEY (node, segment, seq)
);
CREATE INDEX quarantine_received ON quarantine (received);
CREATE TABLE rollup_minute (
    bucket bigint NOT NULL, node text NOT NULL, requests bigint NOT NULL,
    blocked bigint NOT NULL, bytes_in bigint NOT NULL, bytes_out bigint NOT NULL,
    PRIMARY KEY (bucket, node)
);
CREATE TABLE rollup_hour (
    bucket bigint NOT NULL, node text NOT NULL, requests bigint NOT NULL,
    blocked bigint NOT NULL, bytes_in bigint NOT NULL, bytes_out bigint NOT NULL,
    PRIMARY KEY (bucket, node)
);
CREATE TABLE rollup_top (
    dimension text NOT NULL, bucket bigint NOT NULL, node text NOT NULL, key text COLLATE "C" NOT NULL,
    requests bigint NOT NULL, blocked bigint NOT NULL, bytes bigint NOT NULL,
    PRIMARY KEY (dimension, bucket, node, key)
) PARTITION BY RANGE (bucket);
CREATE TABLE rollup_top_other PARTITION OF rollup_top DEFAULT;
CREATE TABLE node_drops (
    node text PRIMARY KEY, total_dropped bigint NOT NULL, reported double precision NOT NULL
);
CREATE TABLE migration_progress (
    source text PRIMARY KEY, last_id bigint NOT NULL, copied bigint NOT NULL, updated timestamptz NOT NULL
);
-- A client address that is not an IP address reads as NULL instead of failing the whole query.
CREATE FUNCTION safesquid_inet(value text) RETURNS inet LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN value::inet;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
CREATE VIEW access_records AS
SELECT time, extract(epoch FROM time)::double precision AS ts, node, safesquid_inet(client) AS client,
       "user", method, url, host, status, bytes_in, bytes_out, duration_ms, action, rule, category,
       application, policy_version,
       coalesce(ARRAY(SELECT jsonb_array_elements_text(dlp)), '{}'::text[]) AS dlp,
       detail, transfer, tls, segment, seq
FROM requests;
"""

# Version 2: every key of the access record is kept. `groups` (the user's policy groups) as text[]
# (NULL when none); `transfer` and `tls` exist since version 1 (IF NOT EXISTS keeps the step safe);
# the minute and hour roll-ups count errors (action "error": 502/504 answers) and client-aborted
# transfers apart. Counts of records stored before this version stay 0 there, as in SQLite: a
# recount would read every record while the master waits to start. The view gains `groups` at its
# end (CREATE OR REPLACE: views that administrators built on it stay valid), and `transfer` reads
# "complete" for records stored before a slave sent the key.
_V2 = """
ALTER TABLE requests ADD COLUMN IF NOT EXISTS transfer text;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS tls text;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS groups text[];
ALTER TABLE rollup_minute ADD COLUMN IF NOT EXISTS errors bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS aborted bigint NOT NULL DEFAULT 0;
ALTER TABLE rollup_hour ADD COLUMN IF NOT EXISTS errors bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS aborted bigint NOT NULL DEFAULT 0;
CREATE OR REPLACE VIEW access_records AS
SELECT time, extract(epoch FROM time)::double precision AS ts, node, safesquid_inet(client) AS client,
       "user", method, url, host, status, bytes_in, bytes_out, duration_ms, action, rule, category,
       application, policy_version,
       coalesce(ARRAY(SELECT jsonb_array_elements_text(dlp)), '{}'::text[]) AS dlp,
       detail, coalesce(transfer, 'complete') AS transfer, tls, segment, seq,
       coalesce(groups, '{}'::text[]) AS groups
FROM requests;
"""

# Version 3: the top roll-up per UTC day for the whole cluster (no node: at most one row per key
# and day however many records), counted at ingest beside the hourly one, so that a top list over a
# week reads whole days from here. Filled from the hourly roll-up of the records already stored.
_V3 = """
CREATE TABLE rollup_top_day (
    dimension text NOT NULL, bucket bigint NOT NULL, key text COLLATE "C" NOT NULL,
    requests bigint NOT NULL, blocked bigint NOT NULL, bytes bigint NOT NULL,
    PRIMARY KEY (dimension, bucket, key)
);
INSERT INTO rollup_top_day (dimension, bucket, key, requests, blocked, bytes)
SELECT dimension, bucket - bucket % 86400, key, sum(requests), sum(blocked), sum(bytes)
FROM rollup_top GROUP BY 1, 2, 3;
"""

# Version 4: ingest at twice the rate. Exactly-once is kept by a ledger of the names stored,
# `ingest_ledger`, one row per run of consecutive names of a (node, segment) (a batch as shipped),
# instead of a unique key on every record: a batch whose names are in the ledger is skipped, and
# the records go in with a plain COPY (the unique index cost as much as the records' own
# indexes). The ledger is filled from the records and quarantined records already stored (runs
# of consecutive sequence numbers, so a gap left by a batch that never arrived stays open).
# The hourly top roll-up becomes cluster-wide, `rollup_top_hour` (dimension, hour, key), partitioned
# by day like the records: the per-node one held about as many rows as records and was most of
# the server's work at ingest. A top list of one node is read from the records themselves (the
# index on (node, time) finds them). Filled from the per-node roll-up, which is then dropped.
_V4 = """
CREATE TABLE ingest_ledger (
    node text NOT NULL, segment bigint NOT NULL, first_seq bigint NOT NULL, last_seq bigint NOT NULL,
    last_time double precision NOT NULL,
    PRIMARY KEY (node, segment, last_seq)
);
INSERT INTO ingest_ledger (node, segment, first_seq, last_seq, last_time)
SELECT node, segment, min(seq), max(seq), max(ts) FROM (
    SELECT node, segment, seq, ts, seq - row_number() OVER (PARTITION BY node, segment ORDER BY seq) AS run
    FROM (SELECT node, segment, seq, extract(epoch FROM time)::double precision AS ts FROM requests
          UNION SELECT node, segment, seq, received FROM quarantine) AS named
) AS runs GROUP BY node, segment, run;
CREATE INDEX ingest_ledger_time ON ingest_ledger (last_time);
CREATE INDEX requests_node ON requests (node, time);
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint WHERE conrelid = 'requests'::regclass AND contype = 'u' LOOP
        EXECUTE format('ALTER TABLE requests DROP CONSTRAINT %I', c.conname);
    END LOOP;
END $$;
CREATE TABLE rollup_top_hour (
    dimension text NOT NULL, bucket bigint NOT NULL, key text COLLATE "C" NOT NULL,
    requests bigint NOT NULL, blocked bigint NOT NULL, bytes bigint NOT NULL,
    PRIMARY KEY (dimension, bucket, key)
) PARTITION BY RANGE (bucket);
CREATE TABLE rollup_top_hour_other PARTITION OF rollup_top_hour DEFAULT;
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class t ON t.oid = i.inhparent
             WHERE t.relname = 'rollup_top' AND c.relname ~ '^rollup_top_[0-9]{8}$' LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF rollup_top_hour %s',
                       replace(p.relname, 'rollup_top_', 'rollup_top_hour_'), p.bound);
    END LOOP;
END $$;
INSERT INTO rollup_top_hour (dimension, bucket, key, requests, blocked, bytes)
SELECT dimension, bucket, key, sum(requests), sum(blocked), sum(bytes) FROM rollup_top GROUP BY 1, 2, 3;
DROP TABLE rollup_top;
"""

# Version 5: one node's top lists without reading its records. `rollup_top_node_hour` (node, hour,
# dimension, key) is counted from the records of a (node, hour) once the node's records have moved
# on to a later hour (a GROUP BY of one hour of one node, done by the writer, at most one per
# commit), and `rollup_top_node_filled` names the (node, hour)s it holds. A commit that stores
# records in a filled (node, hour) unnames it in the same transaction, so a reader sees either the
# counts of an hour or none and then counts that hour from the records: always exact. Partitioned
# by day like the records and dropped with them. Empty after the upgrade; ingest fills the last
# day's hours as it goes.
_V5 = """
CREATE TABLE rollup_top_node_hour (
    node text NOT NULL, bucket bigint NOT NULL, dimension text NOT NULL, key text COLLATE "C" NOT NULL,
    requests bigint NOT NULL, blocked bigint NOT NULL, bytes bigint NOT NULL
) PARTITION BY RANGE (bucket);
CREATE TABLE rollup_top_node_hour_other PARTITION OF rollup_top_node_hour DEFAULT;
CREATE INDEX rollup_top_node_hour_node ON rollup_top_node_hour (node, bucket);
CREATE TABLE rollup_top_node_filled (node text NOT NULL, bucket bigint NOT NULL, PRIMARY KEY (node, bucket));
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class t ON t.oid = i.inhparent
             WHERE t.relname = 'rollup_top_hour' AND c.relname ~ '^rollup_top_hour_[0-9]{8}$' LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF rollup_top_node_hour %s',
                       replace(p.relname, 'rollup_top_hour_', 'rollup_top_node_hour_'), p.bound);
    END LOOP;
END $$;
"""

# Version 6: less work for the server per record at ingest.
# - The roll-up tables updated at every commit keep free room in their pages (fillfactor), so
#   that an upsert that adds to a row writes its new version on the same page without a new
#   index entry (a HOT update): the top roll-ups' upserts cost the server about a third less.
#   Pages written before the upgrade stay full until rewritten; new day partitions of the hourly
#   top roll-up are created with the same setting (`create_day`).
# - The records' index on time alone is a BRIN index (block ranges: records arrive in time
#   order, so a range of pages covers a short span of time), a few kilobytes per day instead of a
#   B-tree entry per record. It serves the queries that select by time only (the ends of a
#   count, retention inside a day, recent records of one kind); a search for the newest records
#   without a filter that has an index of its own reads each node's newest from (node, time)
#   and merges them (`PostgresReportStore.search`). Building it reads the records once (about a
#   minute per 10 million records, at the first start of a master of this version).
ROLLUP_FILLFACTOR = 60
_V6 = f"""
DROP INDEX IF EXISTS requests_time;
CREATE INDEX requests_time_brin ON requests USING brin (time) WITH (pages_per_range = 32, autosummarize = on);
ALTER TABLE rollup_minute SET (fillfactor = {ROLLUP_FILLFACTOR});
ALTER TABLE rollup_hour SET (fillfactor = {ROLLUP_FILLFACTOR});
ALTER TABLE rollup_top_day SET (fillfactor = {ROLLUP_FILLFACTOR});
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class t ON t.oid = i.inhparent WHERE t.relname = 'rollup_top_hour' LOOP
        EXECUTE format('ALTER TABLE %I SET (fillfactor = {ROLLUP_FILLFACTOR})', p.relname);
    END LOOP;
END $$;
"""

# Step n brings version n - 1 to version n. Append, never edit a released step.
MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5, _V6)


def migrate(conn) -> int:
    """Bring the schema to SCHEMA_VERSION (one transaction, serialised by an advisory lock);
    return the version found before. Raises SchemaTooNew for a newer schema."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7140014)")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = row[0] or 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the report store's schema is version {found}, newer than this gateway's"
                f" {SCHEMA_VERSION}: upgrade this master (it will not write into a newer schema)"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return found


def day_of(epoch: float) -> int:
    """The UTC day number (days since 1970-01-01) of an epoch time."""
    return int(epoch // DAY)


def partition_name(day: int, table: str = "requests") -> str:
    return f"{table}_" + (dt.date(1970, 1, 1) + dt.timedelta(days=day)).strftime("%Y%m%d")


def partitioned_days(conn) -> set[int]:
    """Day numbers that have their own partition."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'requests'"
    ).fetchall()
    days = set()
    for (name,) in rows:
        suffix = name.removeprefix("requests_")
        if suffix.isdigit() and len(suffix) == 8:
            date = dt.date(int(suffix[:4]), int(suffix[4:6]), int(suffix[6:]))
            days.add((date - dt.date(1970, 1, 1)).days)
    return days


def wanted_days(days: Iterable[int], now: float) -> set[int]:
    """Those of `days` near enough to now to deserve their own partition."""
    today = day_of(now)
    return {d for d in days if today - PAST_DAYS_PARTITIONED <= d <= today + FUTURE_DAYS_PARTITIONED}


def create_day(conn, day: int) -> None:
    """Create the partitions of `day`, of the records and of the top roll-up (rows of that day
    already in a default partition move into them). Call inside a transaction."""
    start = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=day)
    end = start + dt.timedelta(days=1)
    for table, column, low, high in (
        ("requests", "time", start, end),
        ("rollup_top_hour", "bucket", day * DAY, (day + 1) * DAY),
        ("rollup_top_node_hour", "bucket", day * DAY, (day + 1) * DAY),
    ):
        name = partition_name(day, table)
        where = f"{column} >= %s AND {column} < %s"
        moved = conn.execute(f"SELECT count(*) FROM {table}_other WHERE {where}", (low, high)).fetchone()[0]
        if moved:
            conn.execute(f"CREATE TEMP TABLE moving ON COMMIT DROP AS SELECT * FROM {table}_other WHERE {where}",
                         (low, high))
            conn.execute(f"DELETE FROM {table}_other WHERE {where}", (low, high))
        bounds = (f"('{low.isoformat()}') TO ('{high.isoformat()}')" if table == "requests"
                  else f"({low}) TO ({high})")
        storage = f" WITH (fillfactor = {ROLLUP_FILLFACTOR})" if table == "rollup_top_hour" else ""
        conn.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM {bounds}{storage}")
        if moved:
            conn.execute(f"INSERT INTO {table} SELECT * FROM moving")
            conn.execute("DROP TABLE moving")


def drop_day(conn, day: int) -> None:
    """Drop the partitions of `day` (call inside a transaction)."""
    for table in DAY_PARTITIONED:
        conn.execute(f"DROP TABLE IF EXISTS {partition_name(day, table)}")


# Tables partitioned by day, and the prefix of a day partition detached by retention and not yet
# dropped (its files not yet returned to the disk).
DAY_PARTITIONED = ("requests", "rollup_top_hour", "rollup_top_node_hour")
RETIRED_PREFIX = "retired_"


def retire_day(conn, day: int) -> None:
    """Detach the partitions of `day` from their tables and rename them `retired_...` (call inside
    a transaction). The records leave every query at commit, which is quick: the tables' files
    are removed later by `drop_retired`, whose commit (unlinking gigabytes) holds no lock that
    ingest or a report needs. Dropping an attached partition unlinks them while holding its
    parent table's lock, so ingest and every report wait for the disk."""
    for table in DAY_PARTITIONED:
        name = partition_name(day, table)
        found = conn.execute(
            "SELECT (SELECT count(*) FROM pg_inherits WHERE inhrelid = to_regclass(%s) AND inhparent = %s::regclass)"
            " FROM (SELECT to_regclass(%s) AS r) AS t WHERE r IS NOT NULL", (name, table, name)).fetchone()
        if found is not None:
            if found[0]:  # (a table of that name that is no partition goes the same way)
                conn.execute(f"ALTER TABLE {table} DETACH PARTITION {name}")
            conn.execute(f"DROP TABLE IF EXISTS {RETIRED_PREFIX}{name}")
            conn.execute(f"ALTER TABLE {name} RENAME TO {RETIRED_PREFIX}{name}")


def retired_tables(conn) -> list[str]:
    """Day partitions detached by retention and not yet dropped."""
    patterns = [f"{RETIRED_PREFIX}{table}_%" for table in DAY_PARTITIONED]
    return [name for (name,) in conn.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'r'"
        " AND relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
        " AND relname LIKE ANY (%s) ORDER BY relname", (patterns,))
        if name[len(RETIRED_PREFIX):].rpartition("_")[2].isdigit()]


def drop_retired(conn) -> int:
    """Drop the detached day partitions, one transaction each (the connection in autocommit);
    returns how many."""
    names = retired_tables(conn)
    for name in names:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
    return len(names)


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SchemaTooNew",
    "create_day",
    "day_of",
    "DAY_PARTITIONED",
    "drop_day",
    "drop_retired",
    "migrate",
    "partition_name",
    "partitioned_days",
    "retire_day",
    "retired_tables",
    "wanted_days",
]
