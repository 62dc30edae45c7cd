"""What the report pages and the reports API show, read from the report store.

`parse_period` and `parse_search` are pure (they turn query parameters into a period and
filters, or raise ReportQueryError naming the parameter). `dashboard_data` and `search_data`
query SQLite: call them in a worker thread. The dashboard reads roll-ups only, so its cost does
not grow with the number of stored records.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Mapping

import attrs

from safesquid_tw.reporting import aggregate

PERIODS = {"hour": 3600, "day": 86400, "week": 7 * 86400}
DEFAULT_PERIOD = "day"
# Buckets per chart stay near these: a week by the hour, a day by the quarter hour.
STEP_BY_PERIOD = {"hour": 60, "day": 900, "week": 3600}
CUSTOM_STEPS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 200
MAX_CUSTOM_SPAN = 400 * 86400
TOP_LIMIT = 10
PAGE_SIZE = 50
MAX_PAGE = 10000
MAX_EXPORT_ROWS = 100000
SEARCH_FILTERS = ("node", "user", "client", "domain", "rule", "status", "action", "category", "transfer", "tls")


class ReportQueryError(ValueError):
    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


@attrs.frozen
class ReportPeriod:
    kind: str  # hour, day, week, custom
    start: float
    end: float
    step: int

    def as_json(self) -> dict[str, Any]:
        return {"period": self.kind, "start": self.start, "end": self.end, "step": self.step}


def parse_time(text: str, parameter: str) -> float:
    """Epoch seconds, or an ISO 8601 date and time (UTC unless it names an offset)."""
    text = text.strip()
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else _iso(text)
    except ValueError:
        raise ReportQueryError(parameter, f"{text!r} is not a time (YYYY-MM-DDTHH:MM, UTC, or epoch seconds)") from None


def _iso(text: str) -> float:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def parse_period(params: Mapping[str, str], now: float) -> ReportPeriod:
    kind = params.get("period") or DEFAULT_PERIOD
    if kind in PERIODS:
        return ReportPeriod(kind, now - PERIODS[kind], now, STEP_BY_PERIOD[kind])
    if kind != "custom":
        raise ReportQueryError("period", f"{kind!r} is not one of hour, day, week, custom")
    if not params.get("start") or not params.get("end"):
        raise ReportQueryError("start", "a custom period needs a start and an end")
    start, end = parse_time(params["start"], "start"), parse_time(params["end"], "end")
    if end <= start:
        raise ReportQueryError("end", "the end must be later than the start")
    if end - start > MAX_CUSTOM_SPAN:
        raise ReportQueryError("end", "a period spans at most 400 days")
    span = end - start
    step = next((s for s in CUSTOM_STEPS if span / s <= MAX_BUCKETS), CUSTOM_STEPS[-1])
    return ReportPeriod("custom", start, end, step)


def parse_search(params: Mapping[str, str]) -> tuple[dict[str, Any], int]:
    """(search filters, page number from 1) of the requests table."""
    filters: dict[str, Any] = {}
    for key in SEARCH_FILTERS:
        value = (params.get(key) or "").strip()
        if not value:
            continue
        if key == "status":
            if not value.isdigit() or not 100 <= int(value) <= 999:
                raise ReportQueryError("status", f"{value!r} is not an HTTP status code")
            filters[key] = int(value)
        elif key == "tls":
            if value not in ("inspected", "bypassed", "none"):
                raise ReportQueryError("tls", f"{value!r} is not one of inspected, bypassed, none")
            filters[key] = value
        else:
            filters[key] = value[:300]
    page_text = (params.get("page") or "1").strip()
    if not page_text.isdigit() or not 1 <= int(page_text) <= MAX_PAGE:
        raise ReportQueryError("page", f"{page_text!r} is not a page number")
    return filters, int(page_text)


# -- queries (blocking: run in a thread) --------------------------------------------------------


def known_nodes(store: Any) -> list[str]:
    """Every node the store has records of (from the hourly roll-up: a few rows per node and hour)."""
    rows = store.reader().execute("SELECT DISTINCT node FROM rollup_hour ORDER BY node")
    return [node for (node,) in rows]


def dashboard_data(store: Any, period: ReportPeriod, node: str | None, limit: int = TOP_LIMIT) -> dict[str, Any]:
    start, end = period.start, period.end
    totals = aggregate.totals(store, start, end, node=node)
    tops = {
        dimension: aggregate.top(store, dimension, start, end, node=node, limit=limit,
                                 by="blocked" if dimension == "rule" else "requests")
        for dimension in ("domain", "user", "category", "application", "rule")
    }
    return {
        "totals": totals,
        "per_node": aggregate.per_node(store, start, end) if node is None else {},
        "timeline": aggregate.timeline(store, start, end, step=period.step, node=node),
        "tops": tops,
        "nodes": known_nodes(store),
    }


def search_data(store: Any, period: ReportPeriod, filters: dict[str, Any], page: int,
                page_size: int = PAGE_SIZE) -> dict[str, Any]:
    records = store.search(start=period.start, end=period.end, limit=page_size, offset=(page - 1) * page_size,
                           **filters)
    total = store.count(start=period.start, end=period.end, **filters)
    return {"records": records, "total": total, "page": page, "pages": max(1, math.ceil(total / page_size)),
            "page_size": page_size}


def export_records(store: Any, period: ReportPeriod, filters: dict[str, Any],
                   limit: int = MAX_EXPORT_ROWS) -> list[dict[str, Any]]:
    return store.search(start=period.start, end=period.end, limit=limit, offset=0, **filters)


def totals_json(totals: aggregate.Totals) -> dict[str, int]:
    return {"requests": totals.requests, "allowed": totals.allowed, "blocked": totals.blocked,
            "errors": totals.errors, "client_aborted": totals.aborted,
            "bytes_in": totals.bytes_in, "bytes_out": totals.bytes_out}


def dashboard_json(data: dict[str, Any], period: ReportPeriod, node: str | None) -> dict[str, Any]:
    return {
        **period.as_json(),
        "node": node,
        "totals": totals_json(data["totals"]),
        "per_node": {name: totals_json(t) for name, t in data["per_node"].items()},
        "timeline": [{"start": b.start, **totals_json(b.totals)} for b in data["timeline"]],
        "top": {dimension: [attrs.asdict(e) for e in top.entries] for dimension, top in data["tops"].items()},
        "nodes": data["nodes"],
    }


__all__ = [
    "PAGE_SIZE",
    "PERIODS",
    "ReportPeriod",
    "ReportQueryError",
    "dashboard_data",
    "dashboard_json",
    "export_records",
    "known_nodes",
    "parse_period",
    "parse_search",
    "search_data",
]
