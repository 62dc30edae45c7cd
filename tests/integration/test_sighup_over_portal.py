"""SIGHUP loads the policy file over versions applied through the API: the log warns, the history
entry names the replaced versions, the portal shows a banner, and a rollback brings them back."""

from __future__ import annotations

import json
import urllib.request

import pytest

import harness
from test_portal_restart import Browser

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def api(node: harness.Node, method: str, path: str, body: dict | None = None) -> dict:
    token = (node.state_dir / "api-token").read_text().strip()
    request = urllib.request.Request(node.portal_url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_sighup_over_portal_versions_warns_and_rollback_restores_them(node_factory):
    node = node_factory.start(policy=harness.make_policy())
    portal_rule = {"name": "from-the-api", "action": "deny", "domains": ["api.invalid"]}
    applied = api(node, "POST", "/api/v1/policy/rules", {"rule": portal_rule, "position": "top"})
    assert applied["version"] == 2
    mark = node.extended_mark()
    node.reload(harness.make_policy(rules=[{"name": "from-the-file", "action": "deny", "domains": ["file.invalid"]}]))
    harness.wait_until(lambda: node.health()[1]["policy_version"] == 3, 10, "version 3 from the file")
    line = node.wait_for_extended(lambda text: "replaced version(s) 2" in text, timeout=10, since=mark)
    assert "roll back to version 2" in line
    newest = api(node, "GET", "/api/v1/policy/versions")["versions"][0]
    assert newest["version"] == 3 and "replaced portal/API version(s) 2" in newest["comment"]

    browser = Browser(node.portal)
    browser.login((node.state_dir / "admin-password").read_text().strip())
    _status, home = browser.request("GET", "/")
    assert "Version 3 was loaded from the policy file" in home and "roll back to version 2" in home

    api(node, "POST", "/api/v1/policy/rollback", {"version": 2, "comment": "bring the API's rule back"})
    # With workers the new version reaches each of them a moment after the node swapped it.
    harness.wait_until(lambda: (h := node.health()[1]) and all(
        w["policy_version"] == h["policy_version"] for w in h.get("workers", [])), 10, "every worker on it")
    assert harness.proxy_request(node, "GET", "http://api.invalid/").status == 403
    _status, home = browser.request("GET", "/")
    assert "was loaded from the policy file" not in home
