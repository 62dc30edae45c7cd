"""A backup holds what rebuilding the master needs: history, accounts with hashes, API tokens,
the control-plane TLS key and certificate, and by a switch the report store; a restore warns
and changes nothing before replacing a different key."""

from __future__ import annotations

import io
import json
import tarfile

from portalkit import Portal

from safesquid_tw.cluster.tlsconfig import load_or_create_master_identity
from safesquid_tw.reporting.sqlitestore import ReportStore

NOW = 1_800_000_000.0
BOUNDARY = "backupBoundary"


def identity(portal: Portal):
    return load_or_create_master_identity(portal.state_dir, discover=lambda: ["127.0.0.1"])


def upload(client, data: bytes, *, replace_keys: bool = False):
    fields = [("csrf", client.csrf.encode())] + ([("replace_keys", b"on")] if replace_keys else [])
    body = b""
    for name, value in fields:
        body += f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode() + value + b"\r\n"
    body += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"backup\"; filename=\"b\"\r\n"
             "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return client.request("POST", "/backup/restore", data=body,
                          headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def test_backup_holds_tokens_and_the_control_plane_key(tmp_path):
    portal = Portal(tmp_path / "old")
    old_id = identity(portal)
    token = portal.api_token("ci")
    backup = portal.admin().get("/backup/download").json()
    assert backup["format"] == "safesquid-backup/2"
    assert [t["name"] for t in backup["tokens"]] == ["ci"] and token not in json.dumps(backup)
    assert backup["control_plane_tls"]["fingerprint"] == old_id.fingerprint
    assert "PRIVATE KEY" in backup["control_plane_tls"]["key_pem"]

    fresh = Portal(tmp_path / "new")
    new_id = identity(fresh)
    admin = fresh.admin()
    data = json.dumps(backup).encode()
    warned = upload(admin, data)
    assert warned.code == 409
    assert old_id.fingerprint in warned.text and new_id.fingerprint in warned.text
    assert fresh.store.current.version == 1  # nothing restored
    assert fresh.services.tokens.authenticate(token) is None

    done = upload(admin, data, replace_keys=True)
    assert done.code == 303, done.text
    assert identity(fresh).fingerprint == old_id.fingerprint  # the old master's key, from the next start
    assert fresh.services.tokens.authenticate(token) is not None  # the automation keeps working
    assert fresh.audit()[-1]["key_replaced"] is True


def test_same_key_or_no_key_restores_without_a_question(tmp_path):
    portal = Portal(tmp_path / "old")
    identity(portal)
    backup = json.dumps(portal.admin().get("/backup/download").json()).encode()
    fresh = Portal(tmp_path / "new")  # no control-plane key yet: the backup's is written
    assert upload(fresh.admin(), backup).code == 303
    assert (fresh.state_dir / "tls" / "master.key").stat().st_mode & 0o077 == 0


def record(ts, **fields):
    base = {"ts": ts, "client": "10.0.0.9", "method": "GET", "url": "http://site.test/", "status": 200,
            "action": "allow", "bytes_in": 10, "bytes_out": 100}
    base.update(fields)
    return json.dumps(base).encode()


def test_the_report_store_goes_in_by_a_switch(tmp_path):
    reports = ReportStore(tmp_path / "reports.sqlite3")
    reports.ingest("n1", 1, 1, [record(NOW - 60), record(NOW - 30, action="error", status=502)])
    portal = Portal(tmp_path / "old", reports=reports, wall_start=NOW)
    admin = portal.admin()
    assert 'name="reports"' in admin.get("/backup").text
    plain = admin.get("/backup/download")
    assert plain.header("content-type") == "application/json"
    archive = admin.get("/backup/download?reports=on")
    assert archive.header("content-type") == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive.body), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["backup.json", "reports.sqlite3"]

    fresh_reports = ReportStore(tmp_path / "fresh-reports.sqlite3")
    fresh = Portal(tmp_path / "new", reports=fresh_reports, wall_start=NOW)
    done = upload(fresh.admin(), archive.body)
    assert done.code == 303, done.text
    assert fresh.audit()[-1]["report_records"] == 2
    assert [r["action"] for r in fresh_reports.search(start=0, end=NOW + 1)] == ["error", "allow"]


def test_the_api_restores_an_archive_with_the_report_store(tmp_path):
    reports = ReportStore(tmp_path / "reports.sqlite3")
    reports.ingest("n1", 1, 1, [record(NOW - 60)])
    archive = Portal(tmp_path / "old", reports=reports, wall_start=NOW).admin().get("/backup/download?reports=on").body
    from safesquid_tw.portal.bodylimits import UPLOAD_BODY, body_limit

    assert body_limit(b"/api/v1/restore", b"application/gzip", authenticated=True) == UPLOAD_BODY
    fresh = Portal(tmp_path / "new", reports=ReportStore(tmp_path / "fresh.sqlite3"), wall_start=NOW)
    token = fresh.api_token()
    answer = fresh.client().request("POST", "/api/v1/restore", data=archive,
                                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/gzip"})
    assert answer.code == 200, answer.text
    assert answer.json()["report_records_restored"] == 1
