"""Rule positions in the portal and the API, and shadowed-rule warnings where an administrator
looks: the rules page, the save, the apply, the API answer; the policy file reload warning."""

from __future__ import annotations

import json

import pytest
from portalkit import Portal

from safesquid_tw.policy.history import PolicyHistory
from safesquid_tw.policy.store import PolicyStore
from safesquid_tw.portal.filereload import discarded_warning, replaced_comment, versions_the_file_replaces
from safesquid_tw.portal.positions import move_to, parse_position

LAN_POLICY = {
    "format": "safesquid-policy/1",
    "access": {"default_action": "allow", "rules": [
        {"name": "block-games", "action": "deny", "domains": ["*.games.test"]},
        {"name": "allow-local-networks", "action": "allow", "clients": ["10.0.0.0/8", "127.0.0.0/8"]},
    ]},
}


@pytest.fixture
def portal(tmp_path):
    return Portal(tmp_path, policy=LAN_POLICY)


def names(document):
    return [r["name"] for r in document["access"]["rules"]]


def test_move_to_every_position():
    items = [{"name": n} for n in "abc"]
    assert [i["name"] for i in move_to(items, 2, "top")] == ["c", "a", "b"]
    assert [i["name"] for i in move_to(items, 0, "end")] == ["b", "c", "a"]
    assert [i["name"] for i in move_to(items, 2, "before:b")] == ["a", "c", "b"]
    assert [i["name"] for i in move_to(items, 0, "after:b")] == ["b", "a", "c"]
    with pytest.raises(ValueError):
        move_to(items, 0, "before:zzz")
    assert parse_position({"before": "x"}) == "before:x"
    with pytest.raises(ValueError):
        parse_position({"beside": "x"})


def test_a_new_rule_form_offers_positions_and_defaults_to_the_top(portal):
    admin = portal.admin()
    page = admin.get("/policy/access/rules/new")
    assert '<option value="top" selected>' in page.text
    assert 'value="before:allow-local-networks"' in page.text and 'value="end"' in page.text


@pytest.mark.parametrize("position, expected", [
    ("top", ["block-social", "block-games", "allow-local-networks"]),
    ("before:allow-local-networks", ["block-games", "block-social", "allow-local-networks"]),
    ("end", ["block-games", "allow-local-networks", "block-social"]),
])
def test_a_new_rule_goes_where_the_administrator_says(portal, position, expected):
    admin = portal.admin()
    response = admin.post("/policy/access/rules/new", {"name": "block-social", "action": "deny",
                                                       "domains": "social.test", "position": position})
    assert response.code == 303, response.text
    assert names(portal.services.drafts.load("admin").document) == expected


def test_a_rule_placed_after_allow_local_networks_is_flagged_on_save_and_on_the_rules_page(portal):
    admin = portal.admin()
    admin.post("/policy/access/rules/new", {"name": "block-social", "action": "deny", "domains": "social.test", "enabled": "on",
                                            "position": "end"})
    page = admin.get("/policy/access")
    assert "Warning: rule &#39;block-social&#39; does not apply to clients in 10.0.0.0/8" in page.text
    assert "Partly shadowed: see allow-local-networks above" in page.text
    index = names(portal.services.drafts.load("admin").document).index("block-social")
    admin.post(f"/policy/access/rules/{index}/top", {"original_name": "block-social"})
    assert names(portal.services.drafts.load("admin").document)[0] == "block-social"
    assert "Partly shadowed" not in admin.get("/policy/access").text


def test_a_completely_shadowed_rule_is_a_warning_not_an_error(portal):
    admin = portal.admin()
    response = admin.post("/policy/access/rules/new", {"name": "games-again", "action": "allow", "enabled": "on",
                                                       "domains": "www.games.test", "position": "end"})
    assert response.code == 303
    applied = admin.post("/policy/apply", {"comment": "with a shadowed rule"})
    assert applied.code == 303
    history = admin.get("/policy/history")
    assert "Warning: rule &#39;games-again&#39; never decides" in history.text
    assert portal.store.current.version == 2


def test_the_api_adds_and_moves_rules_and_answers_warnings(portal):
    token = portal.api_token()
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    client = portal.client()
    answer = client.request("POST", "/api/v1/policy/rules", headers=auth, data=json.dumps({
        "rule": {"name": "block-social", "action": "deny", "domains": ["social.test"]}, "position": "end"}))
    assert answer.code == 201, answer.text
    body = answer.json()
    assert body["rules"] == ["block-games", "allow-local-networks", "block-social"]
    assert [w["rule"] for w in body["warnings"]] == ["block-social"]
    moved = client.request("POST", "/api/v1/policy/rules/block-social/move", headers=auth,
                           data=json.dumps({"position": {"before": "allow-local-networks"}}))
    assert moved.code == 201
    assert moved.json()["rules"] == ["block-games", "block-social", "allow-local-networks"]
    assert moved.json()["warnings"] == []
    missing = client.request("POST", "/api/v1/policy/rules/nope/move", headers=auth,
                             data=json.dumps({"position": "top"}))
    assert missing.code == 404
    twice = client.request("POST", "/api/v1/policy/rules", headers=auth, data=json.dumps({
        "rule": {"name": "block-social", "action": "deny"}}))
    assert twice.code == 409


def test_a_file_reload_over_portal_versions_is_named_in_the_history_and_the_portal(tmp_path):
    store = PolicyStore(tmp_path)
    history = PolicyHistory(store, tmp_path)
    source = "file policy.json"
    history.apply(LAN_POLICY, by="policy file", comment="loaded from policy.json", source=source)
    edited = json.loads(json.dumps(LAN_POLICY))
    edited["access"]["default_action"] = "deny"
    history.apply(edited, by="admin", comment="tightened", source="portal")
    replaced = versions_the_file_replaces(history, source)
    assert [i.version for i in replaced] == [2]
    assert discarded_warning(history) is None
    other = json.loads(json.dumps(LAN_POLICY))
    other["access"]["rules"].pop()
    history.apply(other, by="policy file", comment="loaded from policy.json" + replaced_comment(replaced),
                  source=source)
    warning = discarded_warning(history)
    assert "Version 3 was loaded from the policy file" in warning and "roll back to version 2" in warning
