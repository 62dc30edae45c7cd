"""An administrator's day in a real browser: log in, deny a domain, apply, see the proxy refuse
it and the refusal in the reports, roll back, see the domain allowed again.

The nodes are real (`twistd -n safesquid`) on loopback: a standalone node, or a master and a
slave; the browser is the distribution's Chromium under Playwright. The dashboard's screenshots
are kept in `test-artifacts/`.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import attrs
import pytest

import harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
DOMAIN = "localhost"  # resolves to 127.0.0.1, where the test origins listen


@attrs.frozen
class Setup:
    portal: harness.Node  # where the administrator works (and the reports are)
    proxy: harness.Node  # where clients' traffic goes


@pytest.fixture(params=["standalone", "cluster"])
def setup(request, tmp_path, origins):
    """A standalone node (portal and proxy in one), or a master whose slave carries the traffic:
    then the rule applied on the master must reach the slave and its records come back."""
    policy = harness.make_policy(default_action="allow")
    if request.param == "standalone":
        started = harness.start_node(tmp_path, policy=policy, name="portal")
        yield Setup(started, started)
        started.stop()
        return
    from cluster_harness import Cluster

    cluster = Cluster(tmp_path)
    try:
        master = cluster.start_master(policy)
        slave = cluster.add_slave()
        yield Setup(master.node, slave.node)
    finally:
        cluster.stop_all()


def fetch(node, origins, path: str) -> harness.RawResponse:
    return harness.proxy_request(node, "GET", f"http://{DOMAIN}:{origins.ports['http']}{path}")


def wait_for_status(node, origins, path: str, status: int, within: float) -> harness.RawResponse:
    """The proxy answers `status` for the URL within `within` seconds of now."""
    deadline = time.monotonic() + within
    while True:
        response = fetch(node, origins, path)
        if response.status == status or time.monotonic() > deadline:
            assert response.status == status, f"{path}: {response.status} after {within} s, not {status}"
            return response
        time.sleep(0.05)


def test_deny_apply_enforce_report_and_roll_back(browser, setup, origins):
    node = setup.proxy
    check = f"/e2e-{uuid.uuid4().hex[:8]}"
    assert fetch(node, origins, check + "-before").status == 200
    password = (setup.portal.state_dir / "admin-password").read_text().strip()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("dialog", lambda dialog: dialog.accept())  # "Roll back to version 1?" and the like
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    portal = setup.portal.portal_url

    # Log in.
    page.goto(portal + "/")
    assert page.url.startswith(portal + "/login")
    page.fill("#name", "admin")
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(portal + "/")
    assert "Running version" in page.content()

    # A deny rule for the domain, into the draft, then applied.
    page.goto(portal + "/policy/access/rules/new")
    page.fill("#input-name", "block-e2e")
    page.select_option("#input-action", "deny")
    page.fill("#input-reason", "Blocked by the browser test")
    page.fill("#input-domains", DOMAIN)
    page.click("form.item-form button[type=submit]")
    page.wait_for_url(portal + "/policy/access")
    assert "saved in your draft" in page.content()
    page.goto(portal + "/policy/changes")
    assert "block-e2e" in page.inner_text("pre.diff")
    page.fill("#comment", "deny the e2e domain")
    page.click("text=Apply as a new version")
    page.wait_for_url(portal + "/policy/history")
    assert "Version 2 applied" in page.content()
    applied = time.monotonic()

    # The proxy enforces it within a second.
    blocked = wait_for_status(node, origins, check, 403, within=1.0)
    assert time.monotonic() - applied < 1.5
    assert "block-e2e" in blocked.text and "Blocked by the browser test" in blocked.text

    # The blocked request shows in the reports (records reach the store within seconds).
    deadline = time.monotonic() + 20
    while True:
        page.goto(portal + "/reports/requests?period=hour&action=deny")
        if check in page.inner_text("#requests-table") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    table = page.inner_text("#requests-table")
    assert check in table and "block-e2e" in table
    page.goto(portal + "/reports?period=hour")
    assert int(page.inner_text("#total-blocked")) >= 1
    assert "block-e2e" in page.inner_text("#top-rule")
    assert page.locator("svg.chart").count() == 3
    ARTIFACTS.mkdir(exist_ok=True)
    shot = "dashboard.png" if setup.portal is setup.proxy else "dashboard-cluster.png"
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)

    # Roll back to version 1: the domain is allowed again.
    page.goto(portal + "/policy/history")
    page.click("tr:has(a[href='/policy/versions/1']) >> text=Roll back to this")
    page.wait_for_url(portal + "/policy/history")
    assert "Rolled back to version 1" in page.content()
    wait_for_status(node, origins, check + "-after", 200, within=1.0)

    # The history names who did what, and the page ran no script the CSP refused.
    history = page.inner_text("table.history")
    assert "deny the e2e domain" in history and "roll back to version 1" in history
    assert not [e for e in errors if "Content Security Policy" in e], errors
    page.close()
