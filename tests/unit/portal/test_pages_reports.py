"""Report pages: dashboard (server-side SVG charts, top lists), searchable paged requests, CSV."""

from __future__ import annotations

import csv
import io
import json

import pytest
from portalkit import Portal

from safesquid_tw.portal import reportdata as R
from safesquid_tw.portal.svgchart import human_bytes, nice_ceiling, share_bar, stacked_bars
from safesquid_tw.reporting.sqlitestore import ReportStore

NOW = 1_800_000_000.0
HOSTILE_URL = "http://evil.test/<script>alert(1)</script>"


def record(ts, **fields):
    base = {"ts": ts, "client": "10.0.0.9", "user": "alice", "method": "GET", "url": "http://site.test/",
            "status": 200, "action": "allow", "bytes_in": 10, "bytes_out": 100}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def reports(request, tmp_path):
    if request.param == "sqlite":
        store = ReportStore(tmp_path / "reports.sqlite3")
    else:
        from safesquid_tw.reporting.pgstore import PostgresReportStore

        store = PostgresReportStore(request.getfixturevalue("postgres_server").new_database(), wall_clock=lambda: NOW)
    yield store
    store.close()


@pytest.fixture
def portal(tmp_path, reports):
    batch = [record(NOW - 1800 + i * 10, url=f"http://site{i % 5}.test/x", user=f"user{i % 3}",
                    category="news" if i % 2 else None, application="chat" if i % 3 == 0 else None)
             for i in range(120)]
    batch += [record(NOW - 300, url=HOSTILE_URL, action="deny", status=403, rule="<b>evil-rule</b>", user="=cmd|calc")]
    batch += [record(NOW - 3 * 86400, url="http://old.test/")]  # outside a day, inside a week

    reports.ingest("n1", 1, 1, batch)
    reports.ingest("n2", 1, 1, [record(NOW - 60, url="http://other.test/")])
    return Portal(tmp_path, reports=reports, wall_start=NOW)


def test_dashboard_shows_totals_charts_and_top_lists(portal):
    page = portal.admin().get("/reports?period=day")
    assert page.code == 200
    text = page.text
    assert 'id="total-requests">122<' in text and 'id="total-blocked">1<' in text
    assert text.count("<svg") == 3  # allowed/blocked share, requests, bytes
    assert "<script" not in text.replace('<script src="/static/portal.js" defer></script>', "")
    for section in ("top-domain", "top-user", "top-category", "top-application", "top-rule"):
        assert f'id="{section}"' in text
    top_domains = text.split('id="top-domain"')[1].split("</section>")[0]
    assert "site0.test" in top_domains
    assert "&lt;b&gt;evil-rule&lt;/b&gt;" in text and "<b>evil-rule" not in text
    assert "chat" in text.split('id="top-application"')[1].split("</section>")[0]
    assert "dashboard_data" in portal.threads.calls


def test_dashboard_period_and_node_filters(portal):
    admin = portal.admin()
    week = admin.get("/reports?period=week")
    assert 'id="total-requests">123<' in week.text
    one_node = admin.get("/reports?period=day&node=n2")
    assert 'id="total-requests">1<' in one_node.text
    custom = admin.get("/reports?period=custom&start=2027-01-15T07:00&end=2027-01-15T08:00")
    assert custom.code == 200
    bad = admin.get("/reports?period=custom&start=yesterday&end=2027-01-15T08:00")
    assert bad.code == 400 and "start" in bad.text


def test_requests_table_search_paging_and_escaping(portal):
    admin = portal.admin()
    page = admin.get("/reports/requests?period=day")
    assert page.code == 200
    assert "122 request(s)" in page.text and "page 1 of 3" in page.text
    assert "older" in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert(1)" not in page.text
    second = admin.get("/reports/requests?period=day&page=3")
    assert "page 3 of 3" in second.text
    blocked = admin.get("/reports/requests?period=day&action=deny")
    assert "1 request(s)" in blocked.text
    by_domain = admin.get("/reports/requests?period=day&domain=site1.test&user=user1")
    assert "8 request(s)" in by_domain.text
    assert admin.get("/reports/requests?status=abc").code == 400


@pytest.mark.parametrize("table, header", [
    ("timeline", "start,requests,allowed,blocked,bytes_in,bytes_out,errors,client_aborted"),
    ("nodes", "node,requests,allowed,blocked,bytes_in,bytes_out,errors,client_aborted"),
    ("domain", "domain,requests,blocked,bytes"),
    ("user", "user,requests,blocked,bytes"),
    ("category", "category,requests,blocked,bytes"),
    ("application", "application,requests,blocked,bytes"),
    ("rule", "rule,requests,blocked,bytes"),
    ("requests", "time,node,client,user,method,url,status,action,rule,category,application,bytes_in,bytes_out,"
                 "duration_ms,transfer,tls,groups"),
])
def test_every_table_exports_as_csv(portal, table, header):
    response = portal.admin().get(f"/reports/export.csv?table={table}&period=day")
    assert response.code == 200
    assert response.header("content-type") == "text/csv; charset=utf-8"
    assert "attachment" in response.header("content-disposition")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert ",".join(rows[0]) == header
    assert len(rows) > 1


def test_the_user_s_groups_and_inspection_show_in_the_table_and_the_csv(portal, reports):
    reports.ingest("n3", 1, 1, [record(NOW - 200, url="https://tls.test/inside", user="dora",
                                       groups=["staff", "it admins"], tls="inspected")])
    page = portal.admin().get("/reports/requests?period=day&user=dora")
    assert page.code == 200
    assert "staff, it admins" in page.text and ">inspected<" in page.text
    response = portal.admin().get("/reports/export.csv?table=requests&period=day&user=dora")
    [row] = list(csv.DictReader(io.StringIO(response.text)))
    assert row["groups"] == "staff; it admins" and row["tls"] == "inspected"


def test_csv_cells_never_become_formulas(portal):
    response = portal.admin().get("/reports/export.csv?table=requests&period=day&action=deny")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert rows[0]["user"] == "'=cmd|calc"


def test_no_reports_on_a_slave(tmp_path):
    portal = Portal(tmp_path, role="slave", master_address="10.0.0.1:8888")
    assert portal.admin().get("/reports").code == 404


# -- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("params, kind, span, step", [
    ({}, "day", 86400, 900),
    ({"period": "hour"}, "hour", 3600, 60),
    ({"period": "week"}, "week", 7 * 86400, 3600),
    ({"period": "custom", "start": "2027-01-15T00:00", "end": "2027-01-15T06:00"}, "custom", 6 * 3600, 300),
    ({"period": "custom", "start": "2027-01-01T00:00Z", "end": "2027-03-01T00:00Z"}, "custom", 59 * 86400, 86400),
    ({"period": "custom", "start": "1800000000", "end": "1800000600"}, "custom", 600, 60),
])
def test_parse_period(params, kind, span, step):
    period = R.parse_period(params, NOW)
    assert (period.kind, period.end - period.start, period.step) == (kind, span, step)


@pytest.mark.parametrize("params, parameter", [
    ({"period": "year"}, "period"),
    ({"period": "custom"}, "start"),
    ({"period": "custom", "start": "2027-01-02T00:00", "end": "2027-01-01T00:00"}, "end"),
    ({"period": "custom", "start": "2020-01-01T00:00", "end": "2027-01-01T00:00"}, "end"),
    ({"period": "custom", "start": "soon", "end": "2027-01-01T00:00"}, "start"),
])
def test_parse_period_errors(params, parameter):
    with pytest.raises(R.ReportQueryError) as raised:
        R.parse_period(params, NOW)
    assert raised.value.parameter == parameter


@pytest.mark.parametrize("params, filters, page", [
    ({}, {}, 1),
    ({"user": " alice ", "status": "403", "page": "2", "domain": ""}, {"user": "alice", "status": 403}, 2),
])
def test_parse_search(params, filters, page):
    assert R.parse_search(params) == (filters, page)


@pytest.mark.parametrize("params", [{"status": "4xx"}, {"status": "99"}, {"page": "0"}, {"page": "-1"}])
def test_parse_search_errors(params):
    with pytest.raises(R.ReportQueryError):
        R.parse_search(params)


@pytest.mark.parametrize("value, ceiling", [(0, 1), (1, 1), (7, 10), (11, 20), (21, 25), (26, 50), (501, 1000)])
def test_nice_ceiling(value, ceiling):
    assert nice_ceiling(value) == ceiling


def test_stacked_bars_draw_one_bar_per_value_and_escape_text():
    svg = stacked_bars([0, 60, 120], [("a<b>", "#111", [1, 0, 3]), ("c", "#222", [2, 0, 1])], step=60,
                       title="T<script>")
    assert svg.count("<rect") == 4 + 2  # four non-zero values, two legend boxes
    assert "<script>" not in svg and "T&lt;script&gt;" in svg and "a&lt;b&gt;" in svg
    assert "style=" not in svg
    assert stacked_bars([], [("a", "#111", [])], step=60, title="empty").startswith("<svg")


def test_share_bar_and_human_bytes():
    svg = share_bar([("allowed", "#0f0", 3), ("blocked", "#f00", 1)])
    assert "75.0 %" in svg and "25.0 %" in svg
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"


def test_report_pages_say_the_store_is_unavailable_while_its_database_is_down(tmp_path):
    from pgserver import free_port

    from safesquid_tw.reporting.pgstore import PostgresReportStore

    down = PostgresReportStore(f"postgresql://postgres@127.0.0.1:{free_port()}/reports", connect_timeout=1)
    try:
        admin = Portal(tmp_path, reports=down, wall_start=NOW).admin()
        for path in ("/reports", "/reports/requests", "/reports/export.csv?table=requests"):
            page = admin.get(path)
            assert page.code == 503, path
            assert "Report store unavailable" in page.text
            assert page.header("Retry-After") == "30"
    finally:
        down.close()
