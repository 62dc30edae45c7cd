"""Shadowed access rules: complete shadows, the partial one after allow-local-networks, and the
cases that must not warn."""

from __future__ import annotations

import pytest

from safesquid_tw.policy.shadowing import shadowed_rules


def doc(*rules):
    return {"access": {"default_action": "allow", "rules": list(rules)}}


def rule(name, action="deny", **conditions):
    return {"name": name, "action": action, "enabled": True, **conditions}


@pytest.mark.parametrize("earlier, later", [
    (rule("all"), rule("x", domains=["a.test"])),
    (rule("wide", domains=["*.example.test"]), rule("x", domains=["www.example.test", "example.test"])),
    (rule("lan", clients=["10.0.0.0/8"]), rule("x", clients=["10.1.2.0/24"], domains=["a.test"])),
    (rule("ports", ports=["1-1000"]), rule("x", ports=[80, "443-444"])),
    (rule("get", methods=["GET", "POST"]), rule("x", methods=["GET"])),
    (rule("sched", schedule={"days": ["mon"], "from": "08:00", "to": "18:00"}),
     rule("x", schedule={"days": ["mon"], "from": "08:00", "to": "18:00"}, domains=["a.test"])),
])
def test_complete_shadows_are_found(earlier, later):
    [warning] = shadowed_rules(doc(earlier, later))
    assert warning.complete and warning.rule == "x" and warning.by_rule == earlier["name"]
    assert "never decides" in warning.message


@pytest.mark.parametrize("earlier, later", [
    (rule("a", domains=["a.test"]), rule("x", domains=["b.test"])),
    (rule("exact", domains=["example.test"]), rule("x", domains=["*.example.test"])),
    (rule("lan", clients=["10.0.0.0/8"]), rule("x", clients=["192.168.0.0/16"])),
    (rule("urls", url_patterns=["*x*"]), rule("x", url_patterns=["*y*"])),
    (rule("sched", schedule={"days": ["mon"], "from": "08:00", "to": "18:00"}), rule("x")),
    ({**rule("off"), "enabled": False}, rule("x")),
    (rule("users", users=["alice"]), rule("x")),
])
def test_rules_that_can_still_decide_are_not_reported(earlier, later):
    assert shadowed_rules(doc(earlier, later)) == []


def test_a_new_deny_after_allow_local_networks_is_partly_shadowed():
    lan = rule("allow-local-networks", "allow", clients=["10.0.0.0/8", "::1"])
    [warning] = shadowed_rules(doc(lan, rule("block-games", domains=["*.games.test"])))
    assert not warning.complete
    assert "10.0.0.0/8" in warning.message and "move 'block-games' above" in warning.message


def test_a_later_rule_for_other_networks_is_not_partly_shadowed():
    lan = rule("allow-local-networks", "allow", clients=["10.0.0.0/8"])
    assert shadowed_rules(doc(lan, rule("x", clients=["192.0.2.0/24"]))) == []
