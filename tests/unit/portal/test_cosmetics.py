"""What the screenshots showed, fixed: sizes in KiB/MiB/GiB, no "-0.0 s", "an application",
chart labels inside their chart, a 404 with the portal's navigation, one slave banner."""

from __future__ import annotations

import re

import pytest
from portalkit import Portal

from safesquid_tw.pages import format_bytes, format_offset, with_article
from safesquid_tw.portal import svgchart


@pytest.mark.parametrize("value, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"),
                                         (3 * (1 << 30), "3.0 GiB"), (None, "-")])
def test_sizes_people_read(value, text):
    assert format_bytes(value) == text


@pytest.mark.parametrize("value, text", [(-0.04, "0.0 s"), (0.0, "0.0 s"), (0.26, "+0.3 s"), (-1.5, "-1.5 s"),
                                         (None, "-")])
def test_clock_offsets_never_read_minus_zero(value, text):
    assert format_offset(value) == text


def test_articles():
    assert with_article("application") == "an application" and with_article("rule") == "a rule"


def test_chart_labels_stay_inside_the_chart():
    starts = list(range(0, 86400, 3600))
    svg = str(svgchart.stacked_bars(starts, [("sent", "#000", [1023.5 * (1 << 20)] * len(starts))], step=3600,
                                    title="t", value_format=svgchart.human_bytes))
    anchors = re.findall(r'<text x="([\d.]+)" y="212" text-anchor="(\w+)"', svg)
    assert anchors[0][1] == "start" and anchors[-1][1] == "end"
    assert float(anchors[-1][0]) <= svgchart.WIDTH
    widest = max(len(svgchart.human_bytes(v)) for v in (1023.5 * (1 << 20), 2 * 1023.5 * (1 << 20)))
    assert widest * 6.5 <= svgchart._LEFT - 6  # 11 px digits are about 6.5 px wide


def test_an_unknown_page_keeps_the_portal_navigation(tmp_path):
    admin = Portal(tmp_path).admin()
    page = admin.get("/no/such/page")
    assert page.code == 404
    assert 'class="portal-nav"' in page.text and "There is no page at this address" in page.text
    anonymous = Portal(tmp_path / "other").client().get("/no/such/page")
    assert anonymous.code == 404 and 'class="portal-nav"' not in anonymous.text


def test_a_slaves_node_page_says_who_manages_it_once(tmp_path):
    admin = Portal(tmp_path, role="slave", master_address="10.0.0.1:8888").admin()
    page = admin.get("/cluster")
    assert page.text.count("10.0.0.1:8888") == 1
