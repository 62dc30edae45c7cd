"""Policy editing through the portal: section forms, validation errors kept in the form, the
per-administrator draft, apply, history, diff, rollback, backup and restore, hostile strings."""

from __future__ import annotations

import json

import argon2
import pytest
from portalkit import POLICY, Portal

HOSTILE = "<script>alert('x')</script>"


@pytest.fixture
def portal(tmp_path):
    return Portal(tmp_path)


@pytest.fixture
def admin(portal):
    return portal.admin()


RULE = {"name": "block-social", "action": "deny", "reason": "Not at work", "enabled": "on",
        "domains": "social.test\n*.social.test\n", "ports": "80\n8000-8100"}


def test_every_section_page_shows_its_forms(admin):
    for slug, marker in (("access", "block-games"), ("users", "staff"), ("categories", "adult"),
                         ("applications", "Add an application"), ("content", "blocked_mime_types"),
                         ("dlp", "scan_limit_bytes"), ("restriction", "portal_allow"), ("connect", "allowed_ports")):
        page = admin.get(f"/policy/{slug}")
        assert page.code == 200, slug
        assert marker in page.text, slug


def test_new_rule_goes_to_the_draft_not_the_running_policy(portal, admin):
    response = admin.post("/policy/access/rules/new", RULE)
    assert response.code == 303, response.text
    assert response.header("location") == "/policy/access"
    assert portal.store.current.version == 1
    assert [r["name"] for r in portal.store.current.document["access"]["rules"]] == ["block-games"]
    page = admin.get("/policy/access")
    assert "block-social" in page.text and "saved in your draft" in page.text
    draft = portal.services.drafts.load("admin")
    rule = draft.document["access"]["rules"][1]
    assert rule["domains"] == ["social.test", "*.social.test"] and rule["ports"] == [80, "8000-8100"]
    assert "clients" not in rule  # an empty condition is left out, not an empty list


def test_apply_makes_one_version_with_who_when_and_comment(portal, admin):
    admin.post("/policy/access/rules/new", RULE)
    admin.post("/policy/access/settings/default", {"default_action": "deny"})
    changes = admin.get("/policy/changes")
    assert "rule &#39;block-social&#39; added" in changes.text
    assert 'class="diff-add">+' in changes.text
    applied = admin.post("/policy/apply", {"comment": "no social media"})
    assert applied.code == 303 and applied.header("location") == "/policy/history"
    current = portal.store.current
    assert current.version == 2
    assert current.document["access"]["default_action"] == "deny"
    info = portal.history.info(2)
    assert (info.applied_by, info.comment, info.source) == ("admin", "no social media", "portal")
    assert portal.services.drafts.load("admin") is None
    history = admin.get("/policy/history")
    assert "no social media" in history.text and "Version 2 applied" in history.text
    assert "gw1" in history.text  # the node running it
    audit = portal.audit()[-1]
    assert audit["event"] == "apply" and audit["version"] == 2 and audit["actor"] == "admin"


def test_invalid_field_is_shown_next_to_it_and_what_was_typed_stays(portal, admin):
    bad = dict(RULE, domains="good.test\n*.", clients="10.0.0.0/8\nnot-a-network")
    response = admin.post("/policy/access/rules/new", bad)
    assert response.code == 422
    text = response.text
    field = text.split('id="field-clients"')[1].split('<div class="field')[0]
    assert "not-a-network" in field and "is not an IP address or CIDR network" in field
    assert "10.0.0.0/8\nnot-a-network" in text  # the textarea keeps the input
    assert 'value="block-social"' in text
    assert portal.services.drafts.load("admin") is None  # nothing kept


@pytest.mark.parametrize("fields, field, message", [
    ({"name": ""}, "name", "must not be empty"),
    ({"domains": "*."}, "domains", "domain"),
    ({"ports": "99999"}, "ports", "is not a port"),
    ({"schedule": "on", "schedule.from": "25:00", "schedule.days": "mon"}, "schedule.from", "is not a time"),
    ({"name": "block-games"}, "name", "is used twice"),
])
def test_rule_errors_map_to_their_field(admin, fields, field, message):
    response = admin.post("/policy/access/rules/new", dict(RULE, **fields))
    assert response.code == 422
    block = response.text.split(f'id="field-{field}"')[1].split('<div class="field')[0]
    assert message in block, block


def test_number_fields_and_object_sections(portal, admin):
    bad = admin.post("/policy/content/settings/content_security",
                     {"blocked_extensions": "exe\n.msi", "max_upload_bytes": "ten"})
    assert bad.code == 422
    assert "is not a whole number" in bad.text
    assert "ten" in bad.text
    ok = admin.post("/policy/content/settings/content_security",
                    {"blocked_extensions": "exe", "max_upload_bytes": "1048576", "max_download_bytes": ""})
    assert ok.code == 303
    section = portal.services.drafts.load("admin").document["content_security"]
    assert section["max_upload_bytes"] == 1048576 and section["max_download_bytes"] is None


def test_users_passwords_are_hashed_server_side_and_never_shown(portal, admin):
    no_password = admin.post("/policy/users/users/new", {"name": "alice", "groups": "staff"})
    assert no_password.code == 422 and "needs a password" in no_password.text
    created = admin.post("/policy/users/users/new", {"name": "alice", "password": "s3cret-proxy-pw", "groups": "staff"})
    assert created.code == 303
    user = portal.services.drafts.load("admin").document["users"][0]
    assert user["password_hash"].startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(user["password_hash"], "s3cret-proxy-pw")
    assert "hash_password" in portal.threads.calls
    form = admin.get("/policy/users/users/0")
    assert "s3cret-proxy-pw" not in form.text and user["password_hash"] not in form.text
    # Saving again with an empty password keeps the hash.
    admin.post("/policy/users/users/0", {"name": "alice", "password": "", "groups": "staff", "original_name": "alice"})
    assert portal.services.drafts.load("admin").document["users"][0]["password_hash"] == user["password_hash"]
    stored = (portal.state_dir / "portal" / "drafts" / "admin.json").read_text()
    assert "s3cret-proxy-pw" not in stored


def test_deleting_a_referenced_group_is_refused_with_the_reason(portal, admin):
    admin.post("/policy/users/users/new", {"name": "bob", "password": "pw-of-bob-123", "groups": "staff"})
    response = admin.post("/policy/users/groups/0/delete", {"original_name": "staff"})
    assert response.code == 303
    page = admin.get("/policy/users")
    assert "Not done" in page.text and "group &#39;staff&#39; is not defined" in page.text
    assert portal.services.drafts.load("admin").document["groups"] == [{"name": "staff", "description": ""}]


def test_move_and_delete_rules(portal, admin):
    admin.post("/policy/access/rules/new", RULE)
    admin.post("/policy/access/rules/1/up", {"original_name": "block-social"})
    names = [r["name"] for r in portal.services.drafts.load("admin").document["access"]["rules"]]
    assert names == ["block-social", "block-games"]
    stale = admin.post("/policy/access/rules/0/delete", {"original_name": "block-games"})  # index 0 moved
    assert stale.code == 303
    assert len(portal.services.drafts.load("admin").document["access"]["rules"]) == 2
    admin.post("/policy/access/rules/1/delete", {"original_name": "block-games"})
    names = [r["name"] for r in portal.services.drafts.load("admin").document["access"]["rules"]]
    assert names == ["block-social"]


def test_categories_and_applications_and_dlp(portal, admin):
    assert admin.post("/policy/categories/categories/new",
                      {"name": "social", "description": "Social media", "domains": "social.test"}).code == 303
    assert admin.post("/policy/applications/applications/new",
                      {"name": "chat", "hosts": "chat.test", "headers": "user-agent: Chat*"}).code == 303
    bad_headers = admin.post("/policy/applications/applications/new",
                             {"name": "x", "hosts": "x.test", "headers": "no colon"})
    assert bad_headers.code == 422 and "header-name: pattern" in bad_headers.text
    assert admin.post("/policy/dlp/detectors/new",
                      {"name": "cards", "type": "card_number", "action": "block"}).code == 303
    bad_regex = admin.post("/policy/dlp/detectors/new",
                           {"name": "re", "type": "regex", "patterns": "(unclosed", "action": "log"})
    assert bad_regex.code == 422 and "not a valid regular expression" in bad_regex.text
    document = portal.services.drafts.load("admin").document
    assert document["categories"]["social"]["domains"] == ["social.test"]
    assert document["applications"][0]["headers"] == {"user-agent": "Chat*"}
    assert document["dlp"]["detectors"][0]["type"] == "card_number"


def test_access_restriction_section_and_lockout_guard(portal, admin):
    locked_out = admin.post("/policy/restriction/settings/access_restriction",
                            {"portal_allow": "10.9.0.0/16", "slave_allow": "", "slave_allow_enabled": ""})
    assert locked_out.code == 422 and "locked" in locked_out.text
    ok = admin.post("/policy/restriction/settings/access_restriction",
                    {"portal_allow": "127.0.0.0/8\n10.9.0.0/16", "slave_allow": "10.2.0.0/24",
                     "slave_allow_enabled": "on"})
    assert ok.code == 303
    admin.post("/policy/apply", {"comment": "restrict"})
    assert portal.store.current.document["access_restriction"] == {
        "portal_allow": ["127.0.0.0/8", "10.9.0.0/16"], "slave_allow": ["10.2.0.0/24"], "slave_allow_enabled": True}


def test_hostile_strings_render_as_text_everywhere(portal, admin):
    hostile_rule = dict(RULE, name="evil" + HOSTILE[:40], reason=HOSTILE, url_patterns="*" + HOSTILE)
    assert admin.post("/policy/access/rules/new", hostile_rule).code == 303
    admin.post("/policy/apply", {"comment": HOSTILE})
    for path in ("/policy/access", "/policy/access/rules/1", "/policy/history", "/policy/versions/2",
                 "/policy/diff?from=1&to=2", "/audit", "/policy/changes"):
        page = admin.get(path)
        assert page.code == 200, path
        assert "<script>" not in page.text, path
    assert "&lt;script&gt;" in admin.get("/policy/history").text
    invalid = admin.post("/policy/access/rules/new", dict(RULE, name="x", domains=HOSTILE))
    assert invalid.code == 422 and "<script>" not in invalid.text and "&lt;script&gt;" in invalid.text


def test_history_diff_and_rollback(portal, admin):
    admin.post("/policy/access/rules/new", RULE)
    admin.post("/policy/apply", {"comment": "add social"})
    diff = admin.get("/policy/diff?from=1&to=2")
    assert diff.code == 200
    assert 'class="diff-add">+' in diff.text and "block-social" in diff.text
    assert admin.get("/policy/diff?from=1&to=99").code == 404
    rolled = admin.post("/policy/rollback", {"version": "1", "comment": "too strict"})
    assert rolled.code == 303
    current = portal.store.current
    assert current.version == 3
    assert current.digest == portal.history.info(1).digest
    assert portal.history.info(3).applied_by == "admin"
    assert portal.audit()[-1]["event"] == "rollback" and portal.audit()[-1]["to_version"] == 1
    again = admin.post("/policy/rollback", {"version": "3"})
    assert again.code == 303 and portal.store.current.version == 3  # equal content: no new version
    assert admin.post("/policy/rollback", {"version": "77"}).code == 303
    assert "no policy version 77" in admin.get("/policy/history").text


def test_applying_over_a_newer_version_warns_first(portal, admin):
    admin.post("/policy/access/rules/new", RULE)
    other = portal.client()
    other.login()  # the same account elsewhere shares the draft; apply a version through the API instead
    token = portal.api_token()
    document = json.loads(json.dumps(POLICY))
    document["comment"] = "changed by automation"
    api = portal.client().request("POST", "/api/v1/policy", json={"document": document},
                                  headers={"Authorization": f"Bearer {token}"})
    assert api.code == 201
    page = admin.get("/policy/changes")
    assert "version 2 has been applied since" in page.text


def test_discard_the_draft(portal, admin):
    admin.post("/policy/access/rules/new", RULE)
    assert admin.post("/policy/discard").code == 303
    assert portal.services.drafts.load("admin") is None


def test_drafts_are_per_administrator(portal, admin):
    portal.services.accounts.add("bob", "bob-password-123", by="admin")
    bob = portal.client()
    bob.login("bob", "bob-password-123")
    admin.post("/policy/access/rules/new", RULE)
    assert "block-social" not in bob.get("/policy/access").text
    assert "block-social" in admin.get("/policy/access").text


def test_backup_download_and_restore_on_a_fresh_node(tmp_path, portal, admin):
    admin.post("/policy/access/rules/new", RULE)
    admin.post("/policy/apply", {"comment": "v2"})
    download = admin.get("/backup/download")
    assert download.code == 200
    assert "attachment" in download.header("content-disposition")
    backup = download.json()
    assert [v["version"] for v in backup["versions"]] == [1, 2]
    assert backup["versions"][1]["comment"] == "v2"
    # What rebuilding the master needs: accounts with their argon2id hashes (never a password).
    assert backup["accounts"][0]["name"] == "admin"
    assert backup["accounts"][0]["password_hash"].startswith("$argon2id$")
    assert portal.admin_password not in download.text
    # Not on a node an administrator already changed.
    refused = admin.post("/backup/restore", {"backup": download.text})
    assert refused.code == 422 and "fresh" in refused.text
    fresh = Portal(tmp_path / "fresh")
    fresh_admin = fresh.admin()
    restored = fresh_admin.post("/backup/restore", {"backup": download.text})
    assert restored.code == 303, restored.text
    assert fresh.store.current.digest == portal.store.current.digest
    assert "restored: version 2" in fresh.history.info(fresh.store.current.version).comment
    assert fresh.audit()[-1]["event"] == "restore"
    assert fresh.audit()[-1]["passwords_restored"] == ["admin"]
    fresh.client().login("admin", portal.admin_password)  # the backed-up master's password works


def test_restore_refuses_an_invalid_backup_and_changes_nothing(tmp_path, admin, portal):
    fresh = Portal(tmp_path / "fresh")
    fresh_admin = fresh.admin()
    backup = admin.get("/backup/download").json()
    backup["versions"].append({"version": 9, "policy": {"format": "safesquid-policy/1", "access": {}}})
    response = fresh_admin.post("/backup/restore", {"backup": json.dumps(backup)})
    assert response.code == 422 and "version 9 does not validate" in response.text
    assert fresh.store.current.version == 1
    garbage = fresh_admin.post("/backup/restore", {"backup": "not json"})
    assert garbage.code == 422 and "not JSON" in garbage.text


def test_slave_portal_is_read_only_and_names_its_master(tmp_path):
    portal = Portal(tmp_path, role="slave", master_address="10.0.0.1:8888")
    admin = portal.admin()
    page = admin.get("/policy/access")
    assert page.code == 200 and "10.0.0.1:8888" in page.text and "read-only" in page.text
    assert "Save to draft" not in page.text
    assert admin.post("/policy/access/rules/new", RULE).code == 409
    assert admin.post("/policy/apply").code == 409
    assert admin.get("/policy/history").code == 409
    assert admin.get("/backup").code == 409


def test_forwarding_section(portal, admin):
    page = admin.get("/policy/forwarding")
    assert page.code == 200 and "x_forwarded_for" in page.text and "trusted_downstream" in page.text
    bad = admin.post("/policy/forwarding/settings/forwarding",
                     {"x_forwarded_for": "append", "trusted_downstream": "10.0.0.0/33"})
    assert bad.code == 422 and "trusted_downstream" in bad.text
    ok = admin.post("/policy/forwarding/settings/forwarding",
                    {"x_forwarded_for": "replace", "trusted_downstream": "10.0.0.0/8"})
    assert ok.code == 303, ok.text
    admin.post("/policy/apply", {"comment": "forwarding"})
    assert portal.store.current.document["forwarding"] == {"x_forwarded_for": "replace",
                                                           "trusted_downstream": ["10.0.0.0/8"]}
    assert portal.store.current.compiled.forwarding.mode == "replace"
