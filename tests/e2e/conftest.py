"""End-to-end tests in a real browser: the distribution's Chromium driven by Playwright, against
real nodes started with twistd (the integration suite's harness and origin servers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
sys.path.insert(0, str(INTEGRATION))

import harness  # noqa: E402
import origins as origin_servers  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        nodes = harness.live_nodes()
        if nodes:
            report.sections.append(("safesquid node logs", "\n\n".join(n.log_tails() for n in nodes)))


@pytest.fixture(scope="session")
def origins(tmp_path_factory):
    servers = origin_servers.start_origins(tmp_path_factory.mktemp("origins"))
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from the distribution's package; never a downloaded browser build."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
