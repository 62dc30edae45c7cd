"""The compiled rule index agrees with a plain rule-by-rule reading of the policy format."""

from __future__ import annotations

import fnmatch
import ipaddress
from datetime import datetime, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.policy.model import RequestFacts

HASH = "$argon2id$v=19$m=8,t=1,p=1$cJu0yK/+nzC1VtADOSxZHg$zwU5BT7rNZl7tWAPXzBgIdpA+MlVhFqoaKeWqBAiDQc"
HOSTS = ["a.test", "www.a.test", "x.www.a.test", "b.test", "www.b.test", "c.test"]
DOMAIN_PATTERNS = ["a.test", "*.a.test", "www.a.test", "*.www.a.test", "b.test", "*.b.test", "c.test"]
CATEGORIES = {"ca": ["a.test"], "cw": ["www.a.test"], "cb": ["*.b.test"]}
CLIENTS = ["10.0.0.1", "10.1.2.3", "192.168.1.1", "2001:db8::1", "::ffff:10.1.2.3"]
NETWORKS = ["10.0.0.0/8", "10.1.0.0/16", "192.168.1.1", "2001:db8::/32", "0.0.0.0/0"]
METHODS = ["GET", "POST", "CONNECT"]
PORTS = [80, 443, 8080, 8443]
PORT_SPECS = [80, 443, "8000-8100", "400-500"]
USERS = ["alice", "bob"]
GROUPS = ["staff", "admins"]
PATHS = ["/", "/ads/x", "/a.swf"]
URL_PATTERNS = ["*/ads/*", "*.swf", "http://*"]
NOW = datetime(2024, 5, 15, 10, 30, tzinfo=timezone.utc)  # a Wednesday


def subset(values: list[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True)


rule_strategy = st.fixed_dictionaries(
    {"action": st.sampled_from(["allow", "deny"]), "enabled": st.booleans()},
    optional={
        "domains": subset(DOMAIN_PATTERNS),
        "categories": subset(sorted(CATEGORIES)),
        "clients": subset(NETWORKS),
        "methods": subset(METHODS),
        "ports": subset(PORT_SPECS),
        "users": subset(USERS),
        "groups": subset(GROUPS),
        "url_patterns": subset(URL_PATTERNS),
        "schedule": st.sampled_from([{"days": ["wed"], "timezone": "UTC"}, {"days": ["thu"], "timezone": "UTC"}]),
    },
)

facts_strategy = st.builds(
    lambda host, client, method, port, path, user, groups: RequestFacts(
        client_ip=client, method=method, scheme="http", host=host, port=port, path=path,
        user=user, groups=frozenset(groups) if user else frozenset(), now=NOW),
    st.sampled_from(HOSTS), st.sampled_from(CLIENTS), st.sampled_from(METHODS), st.sampled_from(PORTS),
    st.sampled_from(PATHS), st.sampled_from([None, *USERS]), st.lists(st.sampled_from(GROUPS), unique=True),
)


def host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host == pattern[2:] or host.endswith("." + pattern[2:])
    return host == pattern


def category_of(host: str) -> set[str]:
    """Most specific listed domain wins; a plain reading of the format."""
    best: tuple[int, set[str]] = (-1, set())
    for name, domains in CATEGORIES.items():
        for domain in domains:
            domain = domain.removeprefix("*.")
            if host_matches("*." + domain, host):
                if len(domain) > best[0]:
                    best = (len(domain), {name})
                elif len(domain) == best[0]:
                    best[1].add(name)
    return best[1]


def client_in(network: str, client: str) -> bool:
    address = ipaddress.ip_address(client)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    net = ipaddress.ip_network(network)
    return address.version == net.version and address in net


def port_in(spec: int | str, port: int) -> bool:
    if isinstance(spec, int):
        return spec == port
    low, high = map(int, spec.split("-"))
    return low <= port <= high


def reference_rule(rules: list[dict[str, Any]], facts: RequestFacts) -> str | None:
    url = f"http://{facts.host}{'' if facts.port == 80 else f':{facts.port}'}{facts.path}"
    for rule in rules:
        if not rule["enabled"]:
            continue
        checks = [
            "domains" not in rule or any(host_matches(p, facts.host) for p in rule["domains"]),
            "categories" not in rule or bool(category_of(facts.host) & set(rule["categories"])),
            "clients" not in rule or any(client_in(n, facts.client_ip) for n in rule["clients"]),
            "methods" not in rule or facts.method in rule["methods"],
            "ports" not in rule or any(port_in(p, facts.port) for p in rule["ports"]),
            "users" not in rule or facts.user in rule["users"],
            "groups" not in rule or (facts.user is not None and bool(facts.groups & set(rule["groups"]))),
            "url_patterns" not in rule or any(fnmatch.fnmatchcase(url.lower(), p.lower()) for p in rule["url_patterns"]),
            "schedule" not in rule or rule["schedule"]["days"] == ["wed"],
        ]
        if all(checks):
            return rule["name"]
    return None


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(rule_strategy, max_size=12), facts=st.lists(facts_strategy, min_size=1, max_size=10))
def test_index_agrees_with_rule_by_rule_reading(rules: list[dict[str, Any]], facts: list[RequestFacts]) -> None:
    named = [{"name": f"r{i}", **rule} for i, rule in enumerate(rules)]
    doc = {
        "format": "safesquid-policy/1",
        "access": {"default_action": "deny", "rules": named},
        "groups": [{"name": g} for g in GROUPS],
        "users": [{"name": u, "password_hash": HASH} for u in USERS],
        "categories": {name: {"domains": domains} for name, domains in CATEGORIES.items()},
    }
    policy = policy_from_document(doc, 1).compiled
    for fact in facts:
        assert policy.decide(fact).rule == reference_rule(named, fact), fact
