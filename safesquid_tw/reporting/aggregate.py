"""Report aggregations over the report store's roll-ups: totals, time series and top lists.

Every function only reads, returns plain frozen values, and works per node or for the whole
cluster (`node=None`). They read roll-ups, so their cost depends on the length of the period and
the number of distinct keys, not on how many records were stored; the one exception is a top list
of one node in PostgreSQL, which keeps no per-node top roll-up: it counts that node's records of
the period (every dimension in one pass, remembered until the store's next commit).

Granularity follows the roll-ups: totals and time series count whole minutes (a period is widened
to minute boundaries; its whole hours are read from the hour roll-up), top lists whole hours
(widened to hour boundaries). A cluster-wide top list
reads the whole UTC days of its period from the daily top roll-up and its ends from the
cluster-wide hourly one (an end longer than half a day as its day less the hours outside). Each result names the period it really covers. Buckets are aligned to UTC; `align` shifts them (e.g. by a time zone's
offset, in seconds) for people who read their day from local midnight.

Like the store, these run in a worker thread: each thread reads on its own connection.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from safesquid_tw.reporting.sqlitestore import BLOCKED_ACTIONS, TOP_DIMENSIONS, ReportStore

MINUTE = 60
HOUR = 3600
DAY = 86400


@attrs.frozen
class Period:
    start: int
    end: int


@attrs.frozen
class Totals:
    requests: int
    blocked: int
    bytes_in: int
    bytes_out: int
    errors: int = 0  # action "error": the gateway could not serve them (502/504)
    aborted: int = 0  # transfers the client left before the response was complete

    @property
    def allowed(self) -> int:
        return self.requests - self.blocked - self.errors


@attrs.frozen
class TimeBucket:
    start: int
    totals: Totals


@attrs.frozen
class TopEntry:
    key: str
    requests: int
    blocked: int
    bytes: int


@attrs.frozen
class TopList:
    dimension: str
    period: Period
    entries: tuple[TopEntry, ...]


@attrs.frozen
class Dashboard:
    """What the overview page shows for the last `hours`."""

    period: Period
    totals: Totals
    per_node: dict[str, Totals]
    timeline: tuple[TimeBucket, ...]
    tops: dict[str, TopList]


def widen(start: float, end: float, step: int, align: int = 0) -> Period:
    """The smallest period of whole `step`s (counted from `align`) that holds [start, end)."""
    first = math.floor((start - align) / step) * step + align
    last = math.ceil((end - align) / step) * step + align
    return Period(int(first), int(max(last, first)))


def _node_clause(node: str | None) -> tuple[str, tuple[Any, ...]]:
    return ("", ()) if node is None else (" AND node = ?", (node,))


# The minute and hour roll-ups of a period of whole minutes: its whole UTC hours from the hour
# roll-up (60 times fewer rows: a week is 168 rows per node instead of 10,080), the minutes at
# either end from the minute one. Parameters ?1..?4: start, first whole hour, end of the last
# whole hour, end; ?5 the node when `node_filter`.
_TOTAL_COLUMNS = "node, requests, blocked, bytes_in, bytes_out, errors, aborted"


def _minutes_and_hours(node_filter: bool) -> str:
    node = " AND node = ?5" if node_filter else ""
    return (
        f"(SELECT {_TOTAL_COLUMNS} FROM rollup_minute WHERE ((bucket >= ?1 AND bucket < ?2)"
        f" OR (bucket >= ?3 AND bucket < ?4)){node}"
        f" UNION ALL SELECT {_TOTAL_COLUMNS} FROM rollup_hour WHERE bucket >= ?2 AND bucket < ?3{node}) AS parts"
    )


def _hour_split(period: Period) -> tuple[int, int, int, int]:
    first_hour, last_hour = -(-period.start // HOUR) * HOUR, period.end // HOUR * HOUR
    if last_hour <= first_hour:  # no whole hour inside: minutes only
        first_hour = last_hour = period.end
    return period.start, first_hour, last_hour, period.end


def totals(store: ReportStore, start: float, end: float, *, node: str | None = None) -> Totals:
    period = widen(start, end, MINUTE)
    row = store.reader().execute(
        "SELECT coalesce(sum(requests), 0), coalesce(sum(blocked), 0), coalesce(sum(bytes_in), 0),"
        " coalesce(sum(bytes_out), 0), coalesce(sum(errors), 0), coalesce(sum(aborted), 0)"
        f" FROM {_minutes_and_hours(node is not None)}",
        (*_hour_split(period), *(() if node is None else (node,))),
    ).fetchone()
    return Totals(*row)


def per_node(store: ReportStore, start: float, end: float) -> dict[str, Totals]:
    period = widen(start, end, MINUTE)
    rows = store.reader().execute(
        "SELECT node, sum(requests), sum(blocked), sum(bytes_in), sum(bytes_out), sum(errors), sum(aborted)"
        f" FROM {_minutes_and_hours(False)} GROUP BY node ORDER BY node",
        _hour_split(period),
    )
    return {node: Totals(*counts) for node, *counts in rows}


def timeline(
    store: ReportStore,
    start: float,
    end: float,
    *,
    step: int = HOUR,
    node: str | None = None,
    align: int = 0,
) -> tuple[TimeBucket, ...]:
    """Totals per `step` seconds (a multiple of a minute), empty buckets included."""
    if step <= 0 or step % MINUTE:
        raise ValueError("a timeline step must be a positive whole number of minutes")
    period = widen(start, end, step, align)
    # Hour roll-ups are 60 times fewer rows; they serve any step of whole, aligned hours.
    table = "rollup_hour" if step % HOUR == 0 and align % HOUR == 0 else "rollup_minute"
    clause, params = _node_clause(node)
    rows = store.reader().execute(
        "SELECT (bucket - ?1) / ?2 * ?2 + ?1 AS slot, sum(requests), sum(blocked), sum(bytes_in),"
        f" sum(bytes_out), sum(errors), sum(aborted) FROM {table} WHERE bucket >= ?3 AND bucket < ?4{clause}"
        " GROUP BY slot",
        (align, step, period.start, period.end, *params),
    )
    found = {slot: Totals(*counts) for slot, *counts in rows}
    empty = Totals(0, 0, 0, 0)
    return tuple(
        TimeBucket(slot, found.get(slot, empty)) for slot in range(period.start, period.end, step)
    )


def top(
    store: ReportStore,
    dimension: str,
    start: float,
    end: float,
    *,
    node: str | None = None,
    limit: int = 10,
    by: str = "requests",
) -> TopList:
    """The `limit` domains, users, categories or rules with the most requests, blocked requests
    or bytes in the period (widened to whole hours)."""
    if dimension not in TOP_DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; one of {', '.join(TOP_DIMENSIONS)}")
    if by not in ("requests", "blocked", "bytes"):
        raise ValueError("top lists are ordered by requests, blocked or bytes")
    period = widen(start, end, HOUR)
    if node is None:
        sql, params = _cluster_top(dimension, period)
        rows = store.reader().execute(
            f"SELECT key, sum(requests) AS requests, sum(blocked) AS blocked, sum(bytes) AS bytes FROM ({sql})"
            f" AS parts GROUP BY key HAVING sum(requests) > 0 ORDER BY {by} DESC, key LIMIT ?",
            (*params, limit),
        )
    elif getattr(store, "backend", "sqlite") == "postgresql":
        rows = _node_top_from_records(store, dimension, period, node, limit, by)
    else:
        # Each hour named: with the key (dimension, bucket, node, key), one index range per hour
        # holds just this node's rows, where a range of buckets would read every node's.
        hours = range(period.start, period.end, HOUR)
        rows = store.reader().execute(
            "SELECT key, sum(requests) AS requests, sum(blocked) AS blocked, sum(bytes) AS bytes"
            f" FROM rollup_top WHERE dimension = ? AND bucket IN ({', '.join('?' * len(hours))}) AND node = ?"
            f" GROUP BY key ORDER BY {by} DESC, key LIMIT ?",
            (dimension, *hours, node, limit),
        )
    entries = tuple(TopEntry(*row) for row in rows)
    if by == "blocked":
        entries = tuple(entry for entry in entries if entry.blocked)
    return TopList(dimension, period, entries)


def _cluster_top(dimension: str, period: Period) -> tuple[str, list[Any]]:
    """SQL (a UNION ALL of `key, requests, blocked, bytes` rows whose sums per key are the
    period's counts) and its parameters, reading as few roll-up rows as it can: each whole UTC
    day from the daily roll-up; the hours at either end from the cluster-wide hourly one, or, when
    an end holds more than half of its day, that day's daily row minus the hours outside the
    period (so the last 24 hours read one day and at most 12 hours, not 24 hours)."""
    parts: list[str] = []
    params: list[Any] = []

    def hours(low: int, high: int, sign: str = "") -> None:
        if high > low:
            parts.append(f"SELECT key, {sign}requests, {sign}blocked, {sign}bytes FROM rollup_top_hour"
                         " WHERE dimension = ? AND bucket >= ? AND bucket < ?")
            params.extend((dimension, low, high))

    def days(low: int, high: int) -> None:
        if high > low:
            parts.append("SELECT key, requests, blocked, bytes FROM rollup_top_day"
                         " WHERE dimension = ? AND bucket >= ? AND bucket < ?")
            params.extend((dimension, low, high))

    first_day, last_day = -(-period.start // DAY) * DAY, period.end // DAY * DAY
    if last_day < first_day:  # inside one day
        day = period.start // DAY * DAY
        if period.end - period.start > DAY // 2:
            days(day, day + DAY)
            hours(day, period.start, "-")
            hours(period.end, day + DAY, "-")
        else:
            hours(period.start, period.end)
        return " UNION ALL ".join(parts), params
    days(first_day, last_day)
    for low, high, day in ((period.start, first_day, first_day - DAY), (last_day, period.end, last_day)):
        if high - low > DAY // 2:  # the day's row, less the hours of it outside the period
            days(day, day + DAY)
            hours(day, low, "-")
            hours(high, day + DAY, "-")
        else:
            hours(low, high)
    if not parts:
        hours(period.start, period.end)
    return " UNION ALL ".join(parts), params


# Every top list of one node and period, counted in one pass over the node's records, kept for
# the next calls with the same node and period (a dashboard asks for five dimensions in a row)
# until the store commits anything new.
_NODE_TOPS: dict[tuple[Any, ...], dict[str, list[tuple[str, int, int, int]]]] = {}
_BLOCKED_SQL = "(" + ", ".join(f"'{action}'" for action in sorted(BLOCKED_ACTIONS)) + ")"
# The same counts, each hour that `rollup_top_node_hour` holds (named in rollup_top_node_filled)
# read from there, every other hour counted from the node's records of that hour; one statement,
# so one snapshot: an hour unnamed by a commit meanwhile is read from its records, not missed.
_NODE_HOURS_SQL = (
    "WITH filled AS (SELECT bucket FROM rollup_top_node_filled WHERE node = ?1 AND bucket >= ?2 AND bucket < ?3)"
    " SELECT dimension, key COLLATE \"C\", sum(requests), sum(blocked), sum(bytes) FROM ("
    " SELECT dimension, key, requests, blocked, bytes FROM rollup_top_node_hour"
    " WHERE node = ?1 AND bucket >= ?2 AND bucket < ?3 AND bucket IN (SELECT bucket FROM filled)"
    " UNION ALL"
    " SELECT d.dimension, d.key COLLATE \"C\", count(*), count(*) FILTER (WHERE action IN " + _BLOCKED_SQL + "),"
    " sum(bytes_in + bytes_out) FROM generate_series(?2::bigint, ?3::bigint - 3600, 3600) AS h(bucket)"
    " CROSS JOIN LATERAL (SELECT host, \"user\", category, application, rule, action, bytes_in, bytes_out"
    " FROM requests WHERE node = ?1 AND time >= to_timestamp(h.bucket) AND time < to_timestamp(h.bucket + 3600)"
    " OFFSET 0) AS r"  # (not pulled up: an index range per uncounted hour, not a join over the node's records)
    " CROSS JOIN LATERAL (VALUES ('domain', r.host), ('user', r.\"user\"), ('category', r.category),"
    " ('application', r.application), ('rule', r.rule)) AS d(dimension, key)"
    " WHERE h.bucket NOT IN (SELECT bucket FROM filled) AND d.key IS NOT NULL GROUP BY 1, 2"
    ") AS parts GROUP BY 1, 2"
)
_ORDER = {"requests": 1, "blocked": 2, "bytes": 3}


def _node_top_from_records(store: Any, dimension: str, period: Period, node: str, limit: int, by: str) -> Any:
    """A top list of one node in the PostgreSQL store: the hours its per-node hourly top roll-up
    holds from there, the others (the current hour, hours with late records) from the node's
    records of the hour (index on (node, time)), every dimension in one pass."""
    key = (id(store), getattr(store, "generation", None), node, period.start, period.end)
    found = _NODE_TOPS.get(key)
    if found is None:
        found = {d: [] for d in TOP_DIMENSIONS}
        for dim, name, requests, blocked, size in store.reader().execute(
            _NODE_HOURS_SQL, (node, period.start, period.end)
        ):
            found[dim].append((name, requests, blocked, size))
        if key[1] is not None:  # only a store that says when it changed is remembered
            _NODE_TOPS.clear()
            _NODE_TOPS[key] = found
    column = _ORDER[by]
    return sorted(found[dimension], key=lambda row: (-row[column], row[0]))[:limit]

def dashboard(
    store: ReportStore, now: float, *, hours: int = 24, node: str | None = None, limit: int = 10
) -> Dashboard:
    """Totals, per-node totals, an hourly timeline and every top list for the last `hours`."""
    start = now - hours * HOUR
    return Dashboard(
        period=widen(start, now, MINUTE),
        totals=totals(store, start, now, node=node),
        per_node=per_node(store, start, now) if node is None else {},
        timeline=timeline(store, start, now, step=HOUR, node=node),
        tops={d: top(store, d, start, now, node=node, limit=limit) for d in TOP_DIMENSIONS},
    )


__all__ = [
    "DAY",
    "HOUR",
    "MINUTE",
    "Dashboard",
    "Period",
    "TimeBucket",
    "TopEntry",
    "TopList",
    "Totals",
    "dashboard",
    "per_node",
    "timeline",
    "top",
    "totals",
    "widen",
]
