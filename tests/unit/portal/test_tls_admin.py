"""The portal and API side of TLS inspection: the policy section, the CA page and its
replacement (audited, the key never shown), pinned hosts with a one-click bypass."""

from __future__ import annotations

import json

import pytest
from portalkit import Portal

from safesquid_tw.proxy.intercept.ca import CAStore, create_ca
from safesquid_tw.reporting.sqlitestore import ReportStore


@pytest.fixture
def portal(tmp_path):
    portal = Portal(tmp_path, reports=ReportStore(tmp_path / "reports.sqlite3"))
    store = CAStore(portal.state_dir)
    store.load_or_create("portal test CA")
    portal.ctx.ca_store = store
    return portal


@pytest.fixture
def admin(portal):
    return portal.admin()


def test_tls_section_is_edited_like_the_others(portal, admin):
    page = admin.get("/policy/tls")
    assert page.code == 200 and "bypass_domains" in page.text
    response = admin.post("/policy/tls/settings/tls_inspection", {
        "enabled": "on", "bypass_domains": "*.bank.test\nhealth.test", "bypass_clients": "10.1.0.0/16",
        "allow_invalid_upstream_domains": "", "bypass_categories": [], "auto_bypass_pinned": "0"})
    assert response.code == 303, response.text[:500]
    admin.post("/policy/apply", {"comment": "inspect"})
    section = portal.store.current.document["tls_inspection"]
    assert section["enabled"] is True and section["bypass_domains"] == ["*.bank.test", "health.test"]
    assert section["bypass_clients"] == ["10.1.0.0/16"]


def test_ca_page_shows_the_certificate_never_the_key(portal, admin):
    ca = portal.ctx.ca_store.current
    page = admin.get("/tls")
    assert page.code == 200
    assert ca.fingerprint[:2].upper() in page.text and "/inspection-ca.crt" in page.text
    assert "PRIVATE KEY" not in page.text


def test_replacing_the_ca_in_the_portal_is_audited(portal, admin):
    new = create_ca("Org CA")
    response = admin.post("/tls/ca", {"certificate": new.cert_pem.decode(), "key": new.key_pem.decode()})
    assert response.code == 303
    assert portal.ctx.ca_store.current.fingerprint == new.fingerprint
    entries = [e for e in portal.audit() if e["event"] == "tls_ca_replace"]
    assert entries and entries[-1]["fingerprint"] == new.fingerprint
    assert "PRIVATE" not in json.dumps(portal.audit())
    before = portal.ctx.ca_store.current.fingerprint
    admin.post("/tls/ca", {"certificate": "junk", "key": "junk"})
    assert portal.ctx.ca_store.current.fingerprint == before
    assert "was not replaced" in admin.get("/tls").text


def test_api_get_and_put_ca(portal):
    token = portal.api_token()
    client = portal.client()
    auth = {"Authorization": f"Bearer {token}"}
    got = client.request("GET", "/api/v1/tls/ca", headers=auth)
    assert got.code == 200 and "key" not in got.json() and got.json()["certificate"].startswith("-----BEGIN")
    new = create_ca("API CA")
    put = client.request("PUT", "/api/v1/tls/ca", headers=auth,
                         json={"certificate": new.cert_pem.decode(), "key": new.key_pem.decode()})
    assert put.code == 200 and put.json()["fingerprint"] == new.fingerprint
    bad = client.request("PUT", "/api/v1/tls/ca", headers=auth, json={"certificate": new.cert_pem.decode(),
                                                                     "key": create_ca("other").key_pem.decode()})
    assert bad.code == 422 and "does not belong" in bad.json()["message"]
    assert client.request("PUT", "/api/v1/tls/ca", json={}).code == 401


def test_pinned_hosts_listed_with_a_one_click_bypass(portal, admin):
    now = portal.wall[0]
    records = [json.dumps({"ts": now - 10 - i, "client": f"10.0.0.{i}", "method": "CONNECT", "url": "app.pinned.test:443",
                           "status": 200, "bytes_in": 1, "bytes_out": 1, "action": "error", "tls": "inspected",
                           "detail": "the client rejected the inspection certificate (alert bad certificate)"}).encode()
               for i in range(3)]
    portal.ctx.reports.ingest("n1", 1, 0, records)
    from safesquid_tw.portal.tls_admin import pinned_hosts

    assert pinned_hosts(portal.ctx.reports, now=now) == [
        {"host": "app.pinned.test", "rejections": 3, "last": now - 10, "clients": 3}]
    page = admin.get("/tls")
    assert "app.pinned.test" in page.text and "Add to bypass" in page.text
    assert admin.post("/tls/bypass", {"host": "app.pinned.test"}).code == 303
    assert portal.store.current.document["tls_inspection"]["bypass_domains"] == ["app.pinned.test"]
    assert any(e["event"] == "tls_bypass_add" for e in portal.audit())


def test_pinned_hosts_leave_the_page_when_the_portals_clock_passes_their_window(portal, admin):
    from safesquid_tw.portal.tls_admin import PINNED_WINDOW

    now = portal.wall[0]
    record = json.dumps({"ts": now, "client": "10.0.0.1", "method": "CONNECT", "url": "old.pinned.test:443",
                         "status": 200, "bytes_in": 1, "bytes_out": 1, "action": "error", "tls": "inspected",
                         "detail": "the client rejected the inspection certificate (alert bad certificate)"}).encode()
    portal.ctx.reports.ingest("n1", 1, 0, [record])
    assert "old.pinned.test" in admin.get("/tls").text
    portal.wall[0] = now + PINNED_WINDOW + 1
    assert "old.pinned.test" not in admin.get("/tls").text
