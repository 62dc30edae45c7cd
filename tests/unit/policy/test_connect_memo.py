"""CONNECT decisions remembered per policy version: only when nothing but the client's class,
the host, the port and the identity can change them, and always equal to a fresh decision."""

from __future__ import annotations

from typing import Any

import pytest

from safesquid_tw.policy import compiled as compiled_module
from safesquid_tw.policy.model import Identity, RequestFacts
from tests.unit.policy.test_engine import compiled


def connect_facts(client_ip: str, host: str, port: int, identity: Identity | None = None) -> RequestFacts:
    return RequestFacts(
        client_ip=client_ip, method="CONNECT", scheme="tunnel", host=host, port=port, path="",
        user=identity.user if identity else None, groups=identity.groups if identity else frozenset(),
    )


RULES: list[dict[str, Any]] = [
    {"name": "lan-social", "action": "deny", "clients": ["10.0.0.0/8"], "categories": ["social"]},
    {"name": "odd-port", "action": "deny", "ports": [8443]},
    {"name": "staff-news", "action": "deny", "groups": ["staff"], "categories": ["news"]},
    {"name": "url", "action": "deny", "url_patterns": ["https://bad.example*"]},
]


def test_remembered_decisions_equal_fresh_ones() -> None:
    policy = compiled(RULES)
    staff = Identity(user="alice", groups=frozenset({"staff"}))
    cases = [
        ("10.1.2.3", "social.example", 443, None),
        ("10.9.9.9", "social.example", 443, None),  # same class as the line above
        ("192.0.2.1", "social.example", 443, None),
        ("192.0.2.1", "www.example.com", 8443, None),
        ("192.0.2.1", "news.example", 443, staff),
        ("192.0.2.1", "news.example", 443, None),
        ("192.0.2.1", "bad.example", 443, None),
    ]
    for _ in range(2):  # the second round is answered from the memo
        for client, host, port, identity in cases:
            key = policy.connect_memo_key(client, host, port, identity)
            assert key is not None
            fresh = policy.decide(connect_facts(client, host, port, identity))
            remembered = policy.connect_memo.get(key)
            if remembered is None:
                policy.remember_connect(key, fresh, client, host, port, identity)
            else:
                assert remembered == fresh
    assert policy.connect_memo_key("10.1.2.3", "h", 1, None) == policy.connect_memo_key("10.7.7.7", "h", 1, None)
    assert policy.connect_memo_key("10.1.2.3", "h", 1, None) != policy.connect_memo_key("192.0.2.1", "h", 1, None)


def test_not_remembered_when_a_tls_condition_can_change_it() -> None:
    policy = compiled([{"name": "tls", "action": "deny", "tls": ["bypassed"]}])
    assert policy.connect_memo_key("192.0.2.1", "www.example.com", 443, None) is None
    assert policy.connect_memo is False


def test_follows_the_clock_only_where_a_scheduled_rule_could_match() -> None:
    hours = {"days": ["mon"], "from": "09:00", "to": "17:00", "timezone": "UTC"}
    policy = compiled([
        {"name": "hours", "action": "deny", "domains": ["news.example"], "schedule": hours},
        {"name": "lan", "action": "deny", "clients": ["10.0.0.0/8"], "domains": ["social.example"]},
    ])
    for host in ("news.example", "social.example"):
        key = policy.connect_memo_key("10.1.2.3", host, 443, None)
        assert key is not None
        policy.remember_connect(key, policy.decide(connect_facts("10.1.2.3", host, 443)), "10.1.2.3", host, 443, None)
    assert policy.connect_memo[policy.connect_memo_key("10.1.2.3", "news.example", 443, None)] is False
    remembered = policy.connect_memo[policy.connect_memo_key("10.1.2.3", "social.example", 443, None)]
    assert remembered.rule == "lan"


def test_not_remembered_for_hosts_with_application_signatures() -> None:
    policy = compiled(RULES)
    assert policy.connect_memo_key("192.0.2.1", "m.facebook.example", 443, None) is None
    assert policy.connect_memo_key("192.0.2.1", "www.example.com", 443, None) is not None


def test_memo_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(compiled_module, "_CONNECT_MEMO_LIMIT", 3)
    policy = compiled(RULES)
    for i in range(10):
        key = policy.connect_memo_key("192.0.2.1", f"h{i}.example", 443, None)
        policy.remember_connect(key, policy.decide(connect_facts("192.0.2.1", f"h{i}.example", 443)),
                                "192.0.2.1", f"h{i}.example", 443, None)
    assert len(policy.connect_memo) <= 3
