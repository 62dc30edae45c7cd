"""policy/shadowing.py: with rules of many shapes, the warning names the first earlier rule that
covers, whatever group of conditions it belongs to; disabled rules neither shadow nor warn."""

from __future__ import annotations

from safesquid_tw.policy.shadowing import shadowed_rules


def rule(name, action="deny", **conditions):
    return {"name": name, "action": action, **conditions}


def names(document):
    return [(w.rule, w.by_rule, w.complete) for w in shadowed_rules(document)]


def test_the_first_covering_rule_is_named_across_shapes():
    rules = [
        rule("lan", "allow", clients=["10.0.0.0/8"]),          # no other condition: covers any shape
        rule("games", domains=["*.games.test"]),
        rule("games-get", domains=["*.games.test"], methods=["GET"]),
        rule("cat", categories=["c1"]),
        rule("x", domains=["www.games.test"], methods=["get"], clients=["10.1.0.0/16"]),
        rule("y", domains=["a.games.test"], methods=["GET"]),
    ]
    doc = {"access": {"rules": rules}}
    # "lan" decides first for its clients in "games" and "cat" (partly), covers "x" entirely (its
    # clients lie in 10/8, nothing else limits "lan"); "games" covers "games-get" and "y".
    assert names(doc) == [("games", "lan", False), ("games-get", "games", True), ("cat", "lan", False),
                          ("x", "lan", True), ("y", "games", True)]


def test_disabled_rules_neither_shadow_nor_warn():
    rules = [
        rule("off", domains=["*.test"], enabled=False),
        rule("a", domains=["a.test"]),
        rule("b", domains=["a.test"], enabled=False),
        rule("c", domains=["a.test"], ports=[80]),
    ]
    assert names({"access": {"rules": rules}}) == [("c", "a", True)]


def test_partial_shadow_by_client_networks_then_complete_by_a_later_group():
    rules = [
        rule("lan", "allow", clients=["192.0.2.0/24"]),
        rule("ports", "deny", ports=["1-1000"]),
        rule("web", "deny", domains=["a.test"], ports=[80]),
    ]
    assert names({"access": {"rules": rules}}) == [("ports", "lan", False), ("web", "ports", True)]
    rules[1]["enabled"] = False
    assert names({"access": {"rules": rules}}) == [("web", "lan", False)]
