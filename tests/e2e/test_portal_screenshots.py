"""Every portal page in Chromium, screenshot to `test-artifacts/`, with a check that no text
overflows its box: no element's text is wider than the element (unless it scrolls), no chart
label leaves its chart, and no page is wider than the window.

The node is a real standalone node with traffic of every kind in its reports (allowed, blocked,
errors, a download the client left), a rule that an earlier one shadows, and a policy history.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest

import harness
from harness import RawConnection, build_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "pages"
VIEWPORTS = {"wide": {"width": 1366, "height": 900}, "narrow": {"width": 1024, "height": 800}}

# Text boxes narrower than their text, chart labels outside their chart, a page wider than the window.
OVERFLOW_CHECK = """
() => {
  const problems = [];
  const describe = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
    (el.className && typeof el.className === 'string' ? '.' + el.className.trim().replace(/\\s+/g, '.') : '');
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('svg')) continue;
    const cs = getComputedStyle(el);
    if (cs.display === 'none' || cs.visibility === 'hidden' || cs.display === 'inline') continue;
    if (['auto', 'scroll'].includes(cs.overflowX)) continue;
    const text = [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
    if (!text || el.clientWidth === 0) continue;
    if (el.scrollWidth > el.clientWidth + 1) {
      problems.push(`${describe(el)} "${text.slice(0, 40)}": text ${el.scrollWidth}px in a ${el.clientWidth}px box`);
    }
  }
  for (const t of document.querySelectorAll('svg text')) {
    const svg = t.ownerSVGElement, vb = svg.viewBox.baseVal, b = t.getBBox();
    if (b.x < vb.x - 0.5 || b.x + b.width > vb.x + vb.width + 0.5 || b.y < vb.y - 0.5 || b.y + b.height > vb.y + vb.height + 0.5) {
      problems.push(`chart label "${t.textContent}" outside its chart`);
    }
  }
  if (document.documentElement.scrollWidth > window.innerWidth + 1) {
    problems.push(`page ${document.documentElement.scrollWidth}px wide in a ${window.innerWidth}px window`);
  }
  return problems;
}
"""

PAGES = [
    ("login", "/login", False),
    ("home", "/", True),
    ("policy", "/policy", True),
    ("access", "/policy/access", True),
    ("new-rule", "/policy/access/rules/new", True),
    ("rule", "/policy/access/rules/0", True),
    ("users", "/policy/users", True),
    ("categories", "/policy/categories", True),
    ("applications", "/policy/applications", True),
    ("content", "/policy/content", True),
    ("dlp", "/policy/dlp", True),
    ("restriction", "/policy/restriction", True),
    ("connect", "/policy/connect", True),
    ("changes", "/policy/changes", True),
    ("history", "/policy/history", True),
    ("version", "/policy/versions/2", True),
    ("diff", "/policy/diff?from=1&to=2", True),
    ("node", "/cluster", True),
    ("join", "/node/startup", True),
    ("backup", "/backup", True),
    ("accounts", "/accounts", True),
    ("tokens", "/tokens", True),
    ("audit", "/audit", True),
    ("dashboard", "/reports?period=hour", True),
    ("requests", "/reports/requests?period=hour", True),
    ("not-found", "/no/such/page", True),
]

POLICY = harness.make_policy(rules=[
    {"name": "block-games", "action": "deny", "domains": ["games.invalid"], "reason": "No games at work"},
    {"name": "allow-local-networks", "action": "allow", "clients": ["10.0.0.0/8", "192.168.0.0/16"]},
    {"name": "block-a-very-long-rule-name-for-the-streaming-sites", "action": "deny",
     "domains": ["streaming-service-with-a-long-name.invalid", "*.video.invalid"]},
])


def middle_pixel(png: bytes) -> tuple[int, int, int]:
    """The RGB of a PNG screenshot's middle pixel (8-bit RGB or RGBA, as Chromium writes them)."""
    pos, idat, width, height, channels = 8, b"", 0, 0, 3
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, _depth, colour_type = struct.unpack(">IIBB", data[:10])
            channels = 4 if colour_type == 6 else 3
        elif kind == b"IDAT":
            idat += data
    raw, stride, rows, previous = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        previous = line
    middle = rows[height // 2][(width // 2) * channels:(width // 2) * channels + 3]
    return middle[0], middle[1], middle[2]


@pytest.fixture(scope="module")
def node(tmp_path_factory, origins):
    started = harness.start_node(tmp_path_factory.mktemp("screens"), policy=POLICY, name="screens")
    # Traffic of every kind for the reports.
    for i in range(6):
        harness.proxy_request(started, "GET", origins.url(f"/allowed-{i}?q={'x' * 80}"))
    harness.proxy_request(started, "GET", "http://games.invalid/")
    harness.proxy_request(started, "GET", f"http://127.0.0.1:{harness.closed_port()}/refused")
    with RawConnection(started.proxy, timeout=10) as conn:
        conn.send(build_request("GET", origins.url("/trickle?chunks=40&size=100000&interval=0.05")))
        conn.read_head()
    started.wait_for_access(lambda r: "/trickle" in r["url"], timeout=10)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def page_for(browser, node):
    pages = {}

    def get(viewport: str):
        if viewport not in pages:
            page = browser.new_page(viewport=VIEWPORTS[viewport])
            page.on("dialog", lambda dialog: dialog.accept())
            portal = node.portal_url
            page.goto(portal + "/login")
            page.fill("#name", "admin")
            page.fill("#password", (node.state_dir / "admin-password").read_text().strip())
            page.click("button[type=submit]")
            page.wait_for_url(portal + "/")
            if viewport == "wide":
                _make_history(page, portal)
            pages[viewport] = page
        return pages[viewport]

    yield get
    for page in pages.values():
        page.close()


def _make_history(page, portal: str) -> None:
    """Version 2 (so history, version and diff pages have something), and reports with records."""
    page.goto(portal + "/policy/access/rules/new")
    page.fill("#input-name", "allow-updates")
    page.select_option("#input-action", "allow")
    page.fill("#input-domains", "updates.invalid")
    page.select_option("#input-position", "end")
    page.click("form.item-form button[type=submit]")
    page.goto(portal + "/policy/changes")
    page.fill("#comment", "updates allowed")
    page.click("text=Apply as a new version")
    page.wait_for_url(portal + "/policy/history")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        page.goto(portal + "/reports?period=hour")
        if int(page.inner_text("#total-requests")) >= 9:
            return
        time.sleep(0.5)


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
@pytest.mark.parametrize("name, path, login", PAGES, ids=[p[0] for p in PAGES])
def test_page_renders_without_overflow(page_for, node, name, path, login, viewport):
    page = page_for(viewport)
    if not login:
        page = page.context.browser.new_page(viewport=VIEWPORTS[viewport])
    try:
        response = page.goto(node.portal_url + path)
        assert response.status == (404 if name == "not-found" else 200), path
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}-{viewport}.png"), full_page=True)
        problems = page.evaluate(OVERFLOW_CHECK)
        assert not problems, f"{path} at {viewport}: " + "; ".join(problems)
        text = page.inner_text("body")
        assert "-0.0 s" not in text and "Add a application" not in text
        if login:
            assert page.locator("nav.portal-nav").count() == 1  # navigation everywhere, 404 included
        assert page.locator("p.notice-bar").count() <= 1
    finally:
        if not login:
            page.close()


def test_report_pages_show_errors_apart_and_sizes_people_read(page_for, node):
    page = page_for("wide")
    page.goto(node.portal_url + "/reports?period=hour")
    assert int(page.inner_text("#total-errors")) >= 1
    assert int(page.inner_text("#total-aborted")) >= 1
    # Blocked counts are drawn in the colour of blocked traffic, not the browser's green.
    red, green, _blue = middle_pixel(page.locator("#top-rule meter").first.screenshot())
    assert red > 120 and green < 80, (red, green)
    page.goto(node.portal_url + "/reports/requests?period=hour")
    table = page.inner_text("#requests-table")
    assert "left" in table  # the abandoned download
    assert "KiB" in table or "MiB" in table


def test_shadowed_rule_is_flagged_on_the_rules_page(page_for, node):
    page = page_for("wide")
    page.goto(node.portal_url + "/policy/access")
    warning = page.inner_text(".flash-warning")
    assert "does not apply to clients in 10.0.0.0/8" in warning
