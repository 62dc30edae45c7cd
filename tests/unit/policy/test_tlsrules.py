"""The access rule condition `tls` (inspected, bypassed, plain): validation, compilation, matching."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.policy.compiled import CompiledPolicy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.model import RequestFacts
from safesquid_tw.policy.validate import validate_document
from safesquid_tw.portal.formspec import rule_summary

CONNECT = RequestFacts(client_ip="192.0.2.10", method="CONNECT", scheme="https", host="bank.example",
                       port=443, path="")
INSIDE = RequestFacts(client_ip="192.0.2.10", method="GET", scheme="https", host="bank.example", port=443,
                      path="/account", tls="inspected")


def document(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": "safesquid-policy/1",
        "access": {"default_action": "allow", "rules": rules},
        "categories": {"banking": {"domains": ["bank.example"]}},
    }


def compiled(rules: list[dict[str, Any]]) -> CompiledPolicy:
    return policy_from_document(document(rules), 1).compiled


DENY_BYPASSED_BANKING = {"name": "no-blind-banking", "action": "deny", "categories": ["banking"],
                         "tls": ["bypassed"]}


def test_a_rule_on_bypassed_tunnels_matches_only_them():
    policy = compiled([DENY_BYPASSED_BANKING])
    assert policy.uses_tls_condition
    assert policy.decide(attrs.evolve(CONNECT, tls="bypassed")).rule == "no-blind-banking"
    assert policy.decide(attrs.evolve(CONNECT, tls="inspected")).action == "allow"
    assert policy.decide(INSIDE).action == "allow"
    other = attrs.evolve(CONNECT, host="news.example", tls="bypassed")
    assert policy.decide(other).action == "allow"  # the category condition still holds


def test_unknown_mode_satisfies_no_tls_rule_and_other_rules_still_match():
    policy = compiled([DENY_BYPASSED_BANKING, {"name": "all-banking", "action": "deny", "categories": ["banking"]}])
    assert policy.decide(CONNECT).rule == "all-banking"  # tls None: the first rule cannot match
    assert policy.decide(attrs.evolve(CONNECT, tls="bypassed")).rule == "no-blind-banking"


def test_several_modes_in_one_rule_and_first_match_order():
    policy = compiled([
        {"name": "allow-plain", "action": "allow", "tls": ["plain"]},
        {"name": "deny-tls", "action": "deny", "tls": ["inspected", "bypassed"]},
    ])
    plain = RequestFacts(client_ip="192.0.2.10", method="GET", scheme="http", host="a.example", port=80,
                         path="/", tls="plain")
    assert policy.decide(plain).rule == "allow-plain"
    assert policy.decide(INSIDE).rule == "deny-tls"
    assert policy.decide(attrs.evolve(CONNECT, tls="bypassed")).rule == "deny-tls"


def test_policies_without_the_condition_never_look_at_it():
    policy = compiled([{"name": "r", "action": "deny", "categories": ["banking"]}])
    assert not policy.uses_tls_condition
    assert policy.decide(CONNECT).rule == "r"
    assert policy.decide(attrs.evolve(CONNECT, tls="bypassed")).rule == "r"


def test_validation_keeps_the_modes_lower_cased_and_refuses_others():
    canonical = validate_document(document([{"name": "r", "action": "deny", "tls": ["Bypassed", "plain"]}]))
    assert canonical["access"]["rules"][0]["tls"] == ["bypassed", "plain"]
    for bad, why in ((["spliced"], "must be one of inspected, bypassed, plain"), ([], "must not be empty"),
                     ("bypassed", "must be a list"), ([1], "must be a string"),
                     (["plain", "PLAIN"], "")):
        with pytest.raises(PolicyError) as caught:
            validate_document(document([{"name": "r", "action": "deny", "tls": bad}]))
        assert "access.rules[0]" in str(caught.value) and why in str(caught.value)


def test_the_portal_summary_names_the_condition():
    assert "tls: bypassed" in rule_summary(DENY_BYPASSED_BANKING)


def test_shadowing_knows_the_condition():
    from safesquid_tw.policy.shadowing import shadow_messages

    narrow_first = document([DENY_BYPASSED_BANKING, {"name": "all-banking", "action": "allow",
                                                     "categories": ["banking"]}])
    assert shadow_messages(narrow_first) == []  # the earlier rule matches bypassed tunnels only
    wide_first = document([{"name": "all-banking", "action": "allow", "categories": ["banking"]},
                           DENY_BYPASSED_BANKING])
    assert any("no-blind-banking" in m and "never decides" in m for m in shadow_messages(wide_first))
