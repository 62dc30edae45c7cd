"""CompiledPolicy.decide keeps decisions for repeats: a kept decision is the one a fresh
evaluation gives, and a decision that read the time (a schedule) or headers (an application
signature) is never kept."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from safesquid_tw.policy.codec import policy_from_document
from tests.unit.policy.test_engine import BASE, compiled
from tests.unit.policy.test_rule_index import GROUPS, HASH, USERS, CATEGORIES, facts_strategy, rule_strategy

WEDNESDAY = datetime(2024, 5, 15, 10, 30, tzinfo=timezone.utc)
THURSDAY = datetime(2024, 5, 16, 10, 30, tzinfo=timezone.utc)


def _document(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": "safesquid-policy/1",
        "access": {"default_action": "deny", "rules": rules},
        "groups": [{"name": g} for g in GROUPS],
        "users": [{"name": u, "password_hash": HASH} for u in USERS],
        "categories": {name: {"domains": domains} for name, domains in CATEGORIES.items()},
    }


@settings(max_examples=200, deadline=None)
@given(rules=st.lists(rule_strategy, max_size=12), facts=st.lists(facts_strategy, min_size=1, max_size=12),
       days=st.lists(st.sampled_from([WEDNESDAY, THURSDAY]), min_size=12, max_size=12))
def test_repeated_decisions_are_those_of_a_fresh_evaluation(rules, facts, days) -> None:
    named = [{"name": f"r{i}", **rule} for i, rule in enumerate(rules)]
    kept = policy_from_document(_document(named), 1).compiled
    for fact, day in zip(facts * 2, days * 2):
        fact = attrs.evolve(fact, now=day)
        fresh = policy_from_document(_document(named), 1).compiled
        assert kept.decide(fact) == fresh.decide(fact), fact


def test_a_scheduled_rule_is_read_again_at_every_request() -> None:
    policy = compiled([{"name": "weekdays", "action": "deny", "domains": ["www.example.com"],
                        "schedule": {"days": ["wed"], "timezone": "UTC"}}])
    assert policy.decide(attrs.evolve(BASE, now=WEDNESDAY)).rule == "weekdays"
    assert policy.decide(attrs.evolve(BASE, now=THURSDAY)).rule is None
    assert policy.decide(attrs.evolve(BASE, now=WEDNESDAY)).rule == "weekdays"


def test_an_application_read_from_headers_is_read_again_at_every_request() -> None:
    policy = compiled([{"name": "no-fbapp", "action": "deny", "applications": ["fbapp"]}])
    app = attrs.evolve(BASE, host="www.facebook.example", headers={"user-agent": "x FBAN y"})
    browser = attrs.evolve(app, headers={"user-agent": "Mozilla"})
    assert policy.decide(app).rule == "no-fbapp"
    assert policy.decide(browser).rule is None
    assert policy.decide(app).rule == "no-fbapp"


def test_every_fact_of_the_key_tells_decisions_apart() -> None:
    policy = compiled([
        {"name": "by-path", "action": "deny", "url_patterns": ["*/ads/*"]},
        {"name": "by-user", "action": "deny", "users": ["alice"]},
        {"name": "by-port", "action": "deny", "ports": [8080]},
        {"name": "by-method", "action": "deny", "methods": ["POST"]},
        {"name": "by-client", "action": "deny", "clients": ["10.0.0.0/8"]},
        {"name": "by-host", "action": "deny", "domains": ["blocked.example"]},
    ])
    variants = {
        None: BASE,
        "by-path": attrs.evolve(BASE, path="/ads/x"),
        "by-user": attrs.evolve(BASE, user="alice", groups=frozenset({"staff"})),
        "by-port": attrs.evolve(BASE, port=8080),
        "by-method": attrs.evolve(BASE, method="POST"),
        "by-client": attrs.evolve(BASE, client_ip="10.1.2.3"),
        "by-host": attrs.evolve(BASE, host="blocked.example"),
    }
    for _round in range(2):
        for expected, facts in variants.items():
            assert policy.decide(facts).rule == expected


def test_groups_given_as_a_set_are_decided_without_the_memo() -> None:
    policy = compiled([{"name": "staff", "action": "deny", "groups": ["staff"]}])
    facts = attrs.evolve(BASE, user="bob", groups={"staff"})
    assert policy.decide(facts).rule == "staff"
    assert policy.decide(facts).rule == "staff"


def _known(policy, facts):
    return policy.known_decision(facts.host, facts.method, facts.port, facts.client_ip, facts.user, facts.groups,
                                 facts.tls, facts.scheme, facts.path)


def test_known_decision_answers_only_what_decide_kept() -> None:
    policy = compiled([
        {"name": "weekdays", "action": "deny", "domains": ["timed.example"],
         "schedule": {"days": ["wed"], "timezone": "UTC"}},
        {"name": "no-fbapp", "action": "deny", "applications": ["fbapp"]},
        {"name": "ads", "action": "deny", "url_patterns": ["*/ads/*"]},
    ])
    plain = attrs.evolve(BASE, path="/ads/1")
    assert _known(policy, plain) is None
    decision = policy.decide(plain)
    assert decision.rule == "ads" and _known(policy, plain) == decision
    assert _known(policy, attrs.evolve(plain, path="/other")) is None
    for facts in (attrs.evolve(BASE, host="timed.example", now=WEDNESDAY),
                  attrs.evolve(BASE, host="www.facebook.example", headers={"user-agent": "FBAN"})):
        assert policy.decide(facts).rule is not None
        assert _known(policy, facts) is None  # read the time or a header: not kept
    assert policy.known_decision("h", "GET", 80, "192.0.2.1", "bob", {"staff"}, None, "http", "/") is None


def test_kept_decisions_stay_bounded() -> None:
    from safesquid_tw.policy import compiled as compiled_module

    policy = compiled([])
    for i in range(compiled_module._DECISION_MEMO_LIMIT + 10):
        policy.decide(attrs.evolve(BASE, path=f"/p{i}"))
    assert len(policy._decisions) <= compiled_module._DECISION_MEMO_LIMIT
