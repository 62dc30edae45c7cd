"""Report aggregations over the report store's roll-ups: totals, time series and top lists.

Every function only reads, returns plain frozen values, and works per node or for the whole
cluster (`node=None`). They read roll-ups, never the raw records, so their cost depends on the
length of the period and the number of distinct keys, not on how many records were stored.

Granularity follows the roll-ups: totals and time series count whole minutes (a period is widened
to minute boundaries; its whole hours are read from the hour roll-up), top lists whole hours
(widened to hour boundaries). A cluster-wide top list
that spans whole UTC days reads them from the daily top roll-up and only its ends from the hourly
one. Each result names the period it really covers. Buckets are aligned to UTC; `align` shifts them (e.g. by a time zone's
offset, in seconds) for people who read their day from local midnight.

Like the store, these run in a worker thread: each thread reads on its own connection.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from safesquid_tw.reporting.store import TOP_DIMENSIONS, ReportStore

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
    first_day, last_day = -(-period.start // DAY) * DAY, period.end // DAY * DAY
    if node is None and last_day > first_day:
        # Whole UTC days from the daily roll-up (one row per key and day), the hours at either
        # end from the hourly one: the same sums, from far fewer rows over a week or a month.
        rows = store.reader().execute(
            "SELECT key, sum(requests) AS requests, sum(blocked) AS blocked, sum(bytes) AS bytes FROM ("
            " SELECT key, requests, blocked, bytes FROM rollup_top WHERE dimension = ?1"
            " AND ((bucket >= ?2 AND bucket < ?3) OR (bucket >= ?4 AND bucket < ?5))"
            " UNION ALL SELECT key, requests, blocked, bytes FROM rollup_top_day WHERE dimension = ?1"
            " AND bucket >= ?3 AND bucket < ?4"
            f") AS parts GROUP BY key ORDER BY {by} DESC, key LIMIT ?6",
            (dimension, period.start, first_day, last_day, period.end, limit),
        )
    else:
        clause, params = _node_clause(node)
        rows = store.reader().execute(
            "SELECT key, sum(requests) AS requests, sum(blocked) AS blocked, sum(bytes) AS bytes"
            f" FROM rollup_top WHERE dimension = ? AND bucket >= ? AND bucket < ?{clause}"
            f" GROUP BY key ORDER BY {by} DESC, key LIMIT ?",
            (dimension, period.start, period.end, *params, limit),
        )
    entries = tuple(TopEntry(*row) for row in rows)
    if by == "blocked":
        entries = tuple(entry for entry in entries if entry.blocked)
    return TopList(dimension, period, entries)


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
