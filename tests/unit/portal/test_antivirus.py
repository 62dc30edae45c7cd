"""The anti-virus section in the portal: its page, its form, validation next to the field."""

from __future__ import annotations

import pytest
from portalkit import Portal


@pytest.fixture
def portal(tmp_path):
    return Portal(tmp_path)


@pytest.fixture
def admin(portal):
    return portal.admin()


FORM = {"enabled": "on", "icap_services": "icap://127.0.0.1:1344/avscan\nicap://scanner2.test/avscan",
        "scan_downloads": "on", "scan_uploads": "on", "max_scan_bytes": "1048576", "oversize_action": "block",
        "skip_mime_types": "video/*", "timeout_seconds": "20", "fail_mode": "open", "self_test_seconds": "60",
        "verdict_cache_seconds": "600"}


def test_antivirus_page_form_and_apply(portal, admin):
    page = admin.get("/policy/antivirus")
    assert page.code == 200 and "icap_services" in page.text and "fail_mode" in page.text
    bad = admin.post("/policy/antivirus/settings/antivirus", {**FORM, "icap_services": "http://nope/x"})
    assert bad.code == 422 and "icap://" in bad.text
    ok = admin.post("/policy/antivirus/settings/antivirus", FORM)
    assert ok.code == 303
    admin.post("/policy/apply", {"comment": "scan"})
    section = portal.store.current.document["antivirus"]
    assert section["icap_services"] == ["icap://127.0.0.1:1344/avscan", "icap://scanner2.test/avscan"]
    assert section["fail_mode"] == "open" and section["oversize_action"] == "block"
    assert section["max_scan_bytes"] == 1048576 and section["skip_mime_types"] == ["video/*"]
    assert portal.store.current.compiled.antivirus.downloads
