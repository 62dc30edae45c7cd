"""Access decisions: every condition kind, first-match order and the default action."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import pytest

from safesquid_tw.policy.codec import policy_from_document
from safesquid_tw.policy.compiled import CompiledPolicy
from safesquid_tw.policy.engine import decide
from safesquid_tw.policy.model import RequestFacts

# Wednesday 2024-05-15, 10:30 UTC
WEDNESDAY = datetime(2024, 5, 15, 10, 30, tzinfo=timezone.utc)
HASH = "$argon2id$v=19$m=8,t=1,p=1$cJu0yK/+nzC1VtADOSxZHg$zwU5BT7rNZl7tWAPXzBgIdpA+MlVhFqoaKeWqBAiDQc"

BASE = RequestFacts(
    client_ip="192.0.2.10", method="GET", scheme="http", host="www.example.com", port=80,
    path="/index.html", now=WEDNESDAY,
)


def compiled(rules: list[dict[str, Any]], default: str = "allow", **sections: Any) -> CompiledPolicy:
    doc: dict[str, Any] = {
        "format": "safesquid-policy/1",
        "access": {"default_action": default, "rules": rules},
        "groups": [{"name": "staff"}, {"name": "admins"}],
        "users": [{"name": name, "password_hash": HASH, "groups": []} for name in ("alice", "bob")],
        "categories": {
            "social": {"domains": ["social.example"]},
            "webmail": {"domains": ["mail.social.example"]},
            "news": {"domains": ["news.example", "*.daily.example"]},
            "shared-a": {"domains": ["both.example"]},
            "shared-b": {"domains": ["both.example"]},
        },
        "applications": [
            {"name": "fbapp", "hosts": ["*.facebook.example"], "headers": {"user-agent": "*FBAN*"}},
            {"name": "fb", "hosts": ["*.facebook.example"]},
            {"name": "upload", "hosts": ["up.example"], "paths": ["/upload/*"]},
        ],
    }
    doc.update(sections)
    return policy_from_document(doc, 1).compiled


def matches(conditions: dict[str, Any], **facts: Any) -> bool:
    policy = compiled([{"name": "r", "action": "deny", **conditions}])
    return policy.decide(attrs.evolve(BASE, **facts)).rule == "r"


def at(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=timezone.utc)


CASES = [
    # domains
    ("exact domain", {"domains": ["www.example.com"]}, {}, True),
    ("exact domain is not its subdomains", {"domains": ["example.com"]}, {}, False),
    ("exact domain, host case and trailing dot", {"domains": ["www.example.com"]}, {"host": "WWW.Example.COM."}, True),
    ("wildcard, deep subdomain", {"domains": ["*.example.com"]}, {"host": "a.b.example.com"}, True),
    ("wildcard covers the domain itself", {"domains": ["*.example.com"]}, {"host": "example.com"}, True),
    ("wildcard, look-alike host", {"domains": ["*.example.com"]}, {"host": "badexample.com"}, False),
    ("wildcard, other domain", {"domains": ["*.example.com"]}, {"host": "example.org"}, False),
    ("any listed domain", {"domains": ["a.test", "www.example.com"]}, {}, True),
    ("international domain in punycode", {"domains": ["bücher.example"]}, {"host": "xn--bcher-kva.example"}, True),
    ("IPv6 literal host", {"domains": ["::1"]}, {"host": "[::1]"}, True),
    ("IPv4 literal host", {"domains": ["192.0.2.1"]}, {"host": "192.0.2.1"}, True),
    # url patterns
    ("url pattern, path part", {"url_patterns": ["*/ads/*"]}, {"path": "/ads/banner.js"}, True),
    ("url pattern, case-insensitive", {"url_patterns": ["*.swf"]}, {"path": "/movie.SWF"}, True),
    ("url pattern covers the query", {"url_patterns": ["*.swf"]}, {"path": "/movie.swf?x=1"}, False),
    ("url pattern, whole url", {"url_patterns": ["http://www.example.com/index.html"]}, {}, True),
    ("url pattern, explicit port", {"url_patterns": ["http://www.example.com:8080/*"]}, {"port": 8080}, True),
    ("url pattern, default port left out", {"url_patterns": ["http://www.example.com:80/*"]}, {}, False),
    ("url pattern, https default port", {"url_patterns": ["https://www.example.com/*"]},
     {"scheme": "https", "port": 443}, True),
    ("url pattern, ? is one character", {"url_patterns": ["*/a?c"]}, {"path": "/abc"}, True),
    ("url pattern, ? is not two", {"url_patterns": ["*/a?c"]}, {"path": "/abbc"}, False),
    ("url pattern, CONNECT has no path", {"url_patterns": ["https://www.example.com"]},
     {"method": "CONNECT", "scheme": "https", "port": 443, "path": ""}, True),
    # methods
    ("method listed", {"methods": ["POST"]}, {"method": "POST"}, True),
    ("method not listed", {"methods": ["POST"]}, {}, False),
    ("method written in lower case", {"methods": ["connect"]}, {"method": "CONNECT"}, True),
    # ports
    ("single port", {"ports": [80]}, {}, True),
    ("port range inside", {"ports": ["8000-8100"]}, {"port": 8050}, True),
    ("port range upper bound", {"ports": ["8000-8100"]}, {"port": 8100}, True),
    ("port range outside", {"ports": ["8000-8100"]}, {"port": 8101}, False),
    ("ports mixed", {"ports": [443, "1000-2000"]}, {"port": 1000}, True),
    # clients
    ("IPv4 network", {"clients": ["192.0.2.0/24"]}, {}, True),
    ("IPv4 other network", {"clients": ["198.51.100.0/24"]}, {}, False),
    ("IPv4 single address", {"clients": ["192.0.2.10"]}, {}, True),
    ("IPv6 network", {"clients": ["2001:db8::/32"]}, {"client_ip": "2001:db8::5"}, True),
    ("IPv6 network, IPv4 client", {"clients": ["2001:db8::/32"]}, {}, False),
    ("IPv4-mapped IPv6 client", {"clients": ["10.0.0.0/8"]}, {"client_ip": "::ffff:10.1.2.3"}, True),
    ("overlapping networks", {"clients": ["10.0.0.0/8", "10.1.0.0/16"]}, {"client_ip": "10.1.2.3"}, True),
    ("client that is no address", {"clients": ["0.0.0.0/0"]}, {"client_ip": "unix:/run/sock"}, False),
    # users and groups
    ("user, unauthenticated", {"users": ["alice"]}, {}, False),
    ("user listed", {"users": ["alice"]}, {"user": "alice"}, True),
    ("user not listed", {"users": ["alice"]}, {"user": "bob"}, False),
    ("group of the user", {"groups": ["staff"]}, {"user": "bob", "groups": frozenset({"staff"})}, True),
    ("group, user in other groups", {"groups": ["staff"]}, {"user": "bob", "groups": frozenset({"admins"})}, False),
    ("group, unauthenticated", {"groups": ["staff"]}, {"groups": frozenset({"staff"})}, False),
    ("users and groups both must hold", {"users": ["alice"], "groups": ["staff"]},
     {"user": "alice", "groups": frozenset()}, False),
    ("users and groups both hold", {"users": ["alice"], "groups": ["staff"]},
     {"user": "alice", "groups": frozenset({"staff"})}, True),
    # categories
    ("category, listed host", {"categories": ["social"]}, {"host": "social.example"}, True),
    ("category, parent domain listed", {"categories": ["social"]}, {"host": "www.social.example"}, True),
    ("category, more specific domain wins", {"categories": ["social"]}, {"host": "mail.social.example"}, False),
    ("category, the more specific one", {"categories": ["webmail"]}, {"host": "x.mail.social.example"}, True),
    ("category, wildcard entry", {"categories": ["news"]}, {"host": "www.daily.example"}, True),
    ("category, unrelated host", {"categories": ["news"]}, {"host": "news.example.org"}, False),
    ("category, domain in two categories", {"categories": ["shared-b"]}, {"host": "www.both.example"}, True),
    # applications
    ("application by host", {"applications": ["fb"]}, {"host": "www.facebook.example"}, True),
    ("application, first signature wins", {"applications": ["fb"]},
     {"host": "www.facebook.example", "headers": {"user-agent": "Mozilla FBAN/FBIOS"}}, False),
    ("application by header", {"applications": ["fbapp"]},
     {"host": "m.facebook.example", "headers": {"user-agent": "x FBAN y"}}, True),
    ("application, header absent", {"applications": ["fbapp"]}, {"host": "m.facebook.example"}, False),
    ("application by path", {"applications": ["upload"]}, {"host": "up.example", "path": "/upload/a.bin"}, True),
    ("application, path differs", {"applications": ["upload"]}, {"host": "up.example", "path": "/download"}, False),
    ("application, other host", {"applications": ["upload"]}, {"host": "down.example", "path": "/upload/a"}, False),
    # schedules
    ("schedule, inside", {"schedule": {"days": ["wed"], "from": "09:00", "to": "17:00", "timezone": "UTC"}}, {}, True),
    ("schedule, other day", {"schedule": {"days": ["thu"], "from": "09:00", "to": "17:00", "timezone": "UTC"}}, {}, False),
    ("schedule, from is inclusive", {"schedule": {"from": "10:30", "to": "11:00", "timezone": "UTC"}}, {}, True),
    ("schedule, to is exclusive", {"schedule": {"from": "09:00", "to": "10:30", "timezone": "UTC"}}, {}, False),
    ("schedule, days only", {"schedule": {"days": ["wed"], "timezone": "UTC"}}, {}, True),
    ("schedule, until the end of the day", {"schedule": {"from": "23:00", "to": "24:00", "timezone": "UTC"}},
     {"now": at(2024, 5, 15, 23, 59)}, True),
    ("overnight, evening of a listed day",
     {"schedule": {"days": ["fri"], "from": "22:00", "to": "06:00", "timezone": "UTC"}}, {"now": at(2024, 5, 17, 23, 0)}, True),
    ("overnight, morning after a listed day",
     {"schedule": {"days": ["fri"], "from": "22:00", "to": "06:00", "timezone": "UTC"}}, {"now": at(2024, 5, 18, 5, 59)}, True),
    ("overnight, end is exclusive",
     {"schedule": {"days": ["fri"], "from": "22:00", "to": "06:00", "timezone": "UTC"}}, {"now": at(2024, 5, 18, 6, 0)}, False),
    ("overnight, morning of the listed day belongs to the day before",
     {"schedule": {"days": ["fri"], "from": "22:00", "to": "06:00", "timezone": "UTC"}}, {"now": at(2024, 5, 17, 5, 0)}, False),
    ("overnight, evening of an unlisted day",
     {"schedule": {"days": ["fri"], "from": "22:00", "to": "06:00", "timezone": "UTC"}}, {"now": at(2024, 5, 18, 23, 0)}, False),
    ("time zone shifts the hour (10:30 CEST)",
     {"schedule": {"from": "10:00", "to": "11:00", "timezone": "Europe/Berlin"}}, {"now": at(2024, 5, 15, 8, 30)}, True),
    ("time zone shifts the hour (UTC)",
     {"schedule": {"from": "10:00", "to": "11:00", "timezone": "UTC"}}, {"now": at(2024, 5, 15, 8, 30)}, False),
    ("time zone shifts the day (Thursday in Auckland)",
     {"schedule": {"days": ["thu"], "from": "07:00", "to": "09:00", "timezone": "Pacific/Auckland"}},
     {"now": at(2024, 5, 15, 20, 0)}, True),
    ("naive now is UTC", {"schedule": {"from": "10:00", "to": "11:00", "timezone": "UTC"}},
     {"now": datetime(2024, 5, 15, 10, 30)}, True),
    ("aware now in another zone", {"schedule": {"from": "10:00", "to": "11:00", "timezone": "UTC"}},
     {"now": datetime(2024, 5, 15, 12, 30, tzinfo=timezone(timedelta(hours=2)))}, True),
    # several conditions: all must hold
    ("all conditions hold", {"domains": ["*.example.com"], "methods": ["GET"], "ports": [80], "clients": ["192.0.2.0/24"]},
     {}, True),
    ("one condition fails", {"domains": ["*.example.com"], "methods": ["GET"], "ports": [443]}, {}, False),
]


@pytest.mark.parametrize("conditions, facts, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_condition(conditions: dict[str, Any], facts: dict[str, Any], expected: bool) -> None:
    assert matches(conditions, **facts) is expected


def test_first_matching_rule_decides() -> None:
    policy = compiled([
        {"name": "first", "action": "allow", "domains": ["*.example.com"], "reason": "ok"},
        {"name": "second", "action": "deny", "domains": ["www.example.com"]},
    ])
    decision = policy.decide(BASE)
    assert (decision.action, decision.rule, decision.reason) == ("allow", "first", "ok")


def test_rule_failing_its_url_check_falls_through_to_the_next() -> None:
    policy = compiled([
        {"name": "ads", "action": "deny", "domains": ["*.example.com"], "url_patterns": ["*/ads/*"]},
        {"name": "office-hours", "action": "deny", "schedule": {"days": ["thu"], "timezone": "UTC"}},
        {"name": "rest", "action": "allow", "domains": ["*.example.com"]},
    ], default="deny")
    assert policy.decide(BASE).rule == "rest"
    assert policy.decide(attrs.evolve(BASE, path="/ads/x")).rule == "ads"


def test_disabled_rule_is_skipped() -> None:
    policy = compiled([
        {"name": "off", "action": "deny", "enabled": False},
        {"name": "on", "action": "allow"},
    ])
    assert policy.decide(BASE).rule == "on"


@pytest.mark.parametrize("default", ["allow", "deny"])
def test_default_action_when_no_rule_matches(default: str) -> None:
    policy = compiled([{"name": "other", "action": "deny", "domains": ["other.test"]}], default=default)
    decision = policy.decide(BASE)
    assert (decision.action, decision.rule) == (default, None)
    assert f"default action is {default}" in decision.reason


def test_reason_defaults_to_the_rule_name() -> None:
    policy = compiled([{"name": "no-reason", "action": "deny"}])
    assert policy.decide(BASE).reason == "denied by rule no-reason"


def test_order_holds_beyond_sixty_four_rules() -> None:
    rules = [{"name": f"r{i}", "action": "deny", "domains": [f"h{i}.test"]} for i in range(150)]
    rules.insert(140, {"name": "wanted", "action": "allow", "methods": ["PUT"]})
    rules.append({"name": "later", "action": "deny", "methods": ["PUT"]})
    policy = compiled(rules)
    assert policy.decide(attrs.evolve(BASE, method="PUT")).rule == "wanted"
    assert policy.decide(attrs.evolve(BASE, host="h149.test")).rule == "r149"
    assert policy.decide(attrs.evolve(BASE, host="h3.test", method="PUT")).rule == "r3"


def test_decision_reports_category_and_application() -> None:
    policy = compiled([{"name": "r", "action": "deny", "categories": ["shared-b"]}])
    decision = policy.decide(attrs.evolve(BASE, host="both.example"))
    assert decision.category == "shared-b"  # the category the rule matched on
    allowed = policy.decide(attrs.evolve(BASE, host="www.facebook.example"))
    assert (allowed.rule, allowed.application, allowed.category) == (None, "fb", None)


@pytest.mark.parametrize("host, expected", [
    ("social.example", "social"),
    ("deep.www.social.example", "social"),
    ("mail.social.example", "webmail"),
    ("both.example", "shared-a"),
    ("example.net", None),
    ("192.0.2.1", None),
])
def test_category_of(host: str, expected: str | None) -> None:
    policy = compiled([])
    assert policy.category_of(host) == expected
    assert policy.category_of(host.upper()) == expected


def test_categories_of_lists_every_category_of_the_most_specific_domain() -> None:
    assert compiled([]).categories_of("www.both.example") == ("shared-a", "shared-b")


@pytest.mark.parametrize("host, path, headers, expected", [
    ("www.facebook.example", "/", {}, "fb"),
    ("facebook.example", "/", {"user-agent": "FBAN"}, "fbapp"),
    ("up.example", "/upload/x", {}, "upload"),
    ("up.example", "/UPLOAD/x", {}, "upload"),
    ("up.example", "/", {}, None),
    ("example.com", "/", {}, None),
])
def test_application_of(host: str, path: str, headers: dict[str, str], expected: str | None) -> None:
    facts = attrs.evolve(BASE, host=host, path=path, headers=headers)
    assert compiled([]).application_of(facts) == expected


def test_engine_decide_takes_a_policy_or_its_compiled_form() -> None:
    doc = {"format": "safesquid-policy/1", "access": {"default_action": "deny", "rules": [
        {"name": "r", "action": "allow", "domains": ["www.example.com"]}]}}
    policy = policy_from_document(doc, 3)
    assert decide(policy, BASE).rule == "r"
    assert decide(policy.compiled, BASE).rule == "r"


def test_now_defaults_to_the_current_time() -> None:
    weekday = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[datetime.now(timezone.utc).weekday()]
    others = [d for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun") if d != weekday]
    policy = compiled([
        {"name": "not-today", "action": "deny", "schedule": {"days": others, "from": "00:00", "to": "24:00", "timezone": "UTC"}},
    ])
    # Either today in UTC (no match), or the clock crossed midnight between the two lines.
    assert policy.decide(attrs.evolve(BASE, now=None)).rule in (None, "not-today")
    assert policy.decide(attrs.evolve(BASE, now=datetime.now(timezone.utc) + timedelta(days=1))).rule == "not-today"


def test_memo_tables_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import safesquid_tw.policy.compiled as compiled_module

    monkeypatch.setattr(compiled_module, "_MEMO_LIMIT", 10)
    policy = compiled([{"name": "r", "action": "deny", "domains": ["h7.test"]}])
    for i in range(50):
        facts = attrs.evolve(BASE, host=f"h{i}.test", client_ip=f"10.0.0.{i}")
        assert (policy.decide(facts).rule == "r") is (i == 7)
    assert len(policy._hosts) <= 10
    assert len(policy._clients) <= 10


@pytest.mark.parametrize("method, port, expected_url", [
    ("CONNECT", 443, "https://www.example.com"),
    ("CONNECT", 8443, "https://www.example.com:8443"),
    ("GET", 80, "http://www.example.com/index.html"),
])
def test_url_without_a_scheme_assumes_the_usual_one(method: str, port: int, expected_url: str) -> None:
    assert matches({"url_patterns": [expected_url]}, scheme="", method=method, port=port,
                   path="" if method == "CONNECT" else "/index.html")
