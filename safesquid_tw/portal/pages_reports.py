"""Report pages: the dashboard for a period (whole cluster or one node), the searchable table of
requests, and CSV export of every table. Every query runs in a worker thread."""

from __future__ import annotations

import time
from typing import Any

from safesquid_tw.portal import reportdata as R
from safesquid_tw.portal.csvexport import csv_bytes
from safesquid_tw.portal.svgchart import human_bytes, share_bar, stacked_bars
from safesquid_tw.portal.web import CSV, Body, Call, Error, Page, Reply, Route, page_link, route

NO_REPORTS = Error(404, "No reports here", "This node keeps no reports: a slave ships its access records to its "
                   "master, whose portal shows them.")
ALLOWED_COLOUR = "#067647"
BLOCKED_COLOUR = "#b42318"
ERROR_COLOUR = "#b54708"  # amber: neither the green of allowed nor the red of blocked
TOP_TITLES = (("domain", "Top domains"), ("user", "Top users"), ("category", "Top categories"),
              ("application", "Top applications"), ("rule", "Top blocked rules"))
RECORD_COLUMNS = ("time", "node", "client", "user", "method", "url", "status", "action", "rule", "category",
                  "application", "bytes_in", "bytes_out", "duration_ms", "transfer", "tls", "groups")


def _csv_value(record: dict, column: str):
    if column == "time":
        return _iso(record["time"])
    if column == "groups":
        return "; ".join(record.get("groups") or ())  # one cell; group names may hold blanks
    return record.get(column)


def _params(call: Call) -> dict[str, str]:
    return {k: call.form.get(k) for k in call.form.fields}


def _period_inputs(period: R.ReportPeriod) -> dict[str, str]:
    fmt = "%Y-%m-%dT%H:%M"
    return {"start": time.strftime(fmt, time.gmtime(period.start)), "end": time.strftime(fmt, time.gmtime(period.end))}


def _period_or_error(call: Call) -> R.ReportPeriod | Error:
    try:
        return R.parse_period(_params(call), call.services.now())
    except R.ReportQueryError as e:
        return Error(400, "Bad report period", str(e))


def charts(data: dict[str, Any], step: int) -> dict[str, Any]:
    timeline = data["timeline"]
    starts = [b.start for b in timeline]
    totals = data["totals"]
    return {
        "requests": stacked_bars(starts, [
            ("allowed", ALLOWED_COLOUR, [b.totals.allowed for b in timeline]),
            ("blocked", BLOCKED_COLOUR, [b.totals.blocked for b in timeline]),
            ("errors", ERROR_COLOUR, [b.totals.errors for b in timeline]),
        ], step=step, title="Requests over time"),
        "bytes": stacked_bars(starts, [
            ("received from clients", "#1d4e89", [b.totals.bytes_in for b in timeline]),
            ("sent to clients", "#7a9cc6", [b.totals.bytes_out for b in timeline]),
        ], step=step, title="Bytes over time", value_format=human_bytes),
        "share": share_bar([("allowed", ALLOWED_COLOUR, totals.allowed), ("blocked", BLOCKED_COLOUR, totals.blocked),
                            ("errors", ERROR_COLOUR, totals.errors)]),
    }


async def dashboard(call: Call) -> Reply:
    reports = call.services.ctx.reports
    if reports is None:
        return NO_REPORTS
    period = _period_or_error(call)
    if isinstance(period, Error):
        return period
    node = call.form.get("node") or None
    data = await call.services.in_thread(R.dashboard_data, reports, period, node)
    nodes = sorted(set(data["nodes"]) | ({node} if node else set()))
    query = {"period": period.kind, "node": node or "", **(_period_inputs(period) if period.kind == "custom" else {})}
    return Page("portal/dashboard.html", {
        "period": period, "inputs": _period_inputs(period), "node_filter": node, "nodes": nodes,
        "data": data, "charts": charts(data, period.step), "top_titles": TOP_TITLES, "query": query,
        "export": lambda table: page_link("/reports/export.csv", table=table, **query),
        "human_bytes": human_bytes,
    })


async def requests_page(call: Call) -> Reply:
    reports = call.services.ctx.reports
    if reports is None:
        return NO_REPORTS
    period = _period_or_error(call)
    if isinstance(period, Error):
        return period
    try:
        filters, page = R.parse_search(_params(call))
    except R.ReportQueryError as e:
        return Error(400, "Bad search", str(e))
    found = await call.services.in_thread(R.search_data, reports, period, filters, page)
    query = {"period": period.kind, **(_period_inputs(period) if period.kind == "custom" else {}),
             **{k: str(v) for k, v in filters.items()}}
    return Page("portal/requests.html", {
        "period": period, "inputs": _period_inputs(period), "filters": filters, "found": found,
        "link": lambda **changes: page_link("/reports/requests", **{**query, **changes}),
        "export": page_link("/reports/export.csv", table="requests", **query),
    })


def _top_rows(top: Any) -> list[tuple[Any, ...]]:
    return [(e.key, e.requests, e.blocked, e.bytes) for e in top.entries]


async def export_csv(call: Call) -> Reply:
    reports = call.services.ctx.reports
    if reports is None:
        return NO_REPORTS
    period = _period_or_error(call)
    if isinstance(period, Error):
        return period
    table = call.form.get("table")
    node = call.form.get("node") or None
    if table == "requests":
        try:
            filters, _page = R.parse_search(_params(call))
        except R.ReportQueryError as e:
            return Error(400, "Bad search", str(e))
        records = await call.services.in_thread(R.export_records, reports, period, filters)
        rows = [[_csv_value(r, c) for c in RECORD_COLUMNS] for r in records]
        data = csv_bytes(RECORD_COLUMNS, rows)
    else:
        dashboard_data = await call.services.in_thread(R.dashboard_data, reports, period, node, 100)
        if table == "timeline":
            data = csv_bytes(("start", "requests", "allowed", "blocked", "bytes_in", "bytes_out", "errors",
                              "client_aborted"), [
                (_iso(b.start), b.totals.requests, b.totals.allowed, b.totals.blocked, b.totals.bytes_in,
                 b.totals.bytes_out, b.totals.errors, b.totals.aborted) for b in dashboard_data["timeline"]])
        elif table == "nodes":
            data = csv_bytes(("node", "requests", "allowed", "blocked", "bytes_in", "bytes_out", "errors",
                              "client_aborted"), [
                (name, t.requests, t.allowed, t.blocked, t.bytes_in, t.bytes_out, t.errors, t.aborted)
                for name, t in dashboard_data["per_node"].items()])
        elif table in dashboard_data["tops"]:
            data = csv_bytes((table, "requests", "blocked", "bytes"), _top_rows(dashboard_data["tops"][table]))
        else:
            return Error(400, "Bad export", "table is one of timeline, nodes, domain, user, category, application, "
                         "rule, requests")
    name = f"safesquid-{table}-{time.strftime('%Y%m%d-%H%M', time.gmtime(period.end))}.csv".encode()
    return Body(data, CSV, headers=((b"Content-Disposition", b'attachment; filename="' + name + b'"'),))


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


ROUTES: list[Route] = [
    route("GET", "/reports", dashboard),
    route("GET", "/reports/requests", requests_page),
    route("GET", "/reports/export.csv", export_csv),
]

__all__ = ["ROUTES", "charts"]
