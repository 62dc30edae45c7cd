"""Validation: the canonical form, and one precise error (path and message) per kind of mistake."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from safesquid_tw.policy.codec import (
    PolicyError,
    canonical_bytes,
    digest,
    load_policy_bytes,
    validate_document,
)

HASH = "$argon2id$v=19$m=8,t=1,p=1$cJu0yK/+nzC1VtADOSxZHg$zwU5BT7rNZl7tWAPXzBgIdpA+MlVhFqoaKeWqBAiDQc"


def base() -> dict[str, Any]:
    return {
        "format": "safesquid-policy/1",
        "access": {"default_action": "deny", "rules": [{"name": "r", "action": "deny"}]},
        "groups": [{"name": "staff"}],
        "users": [{"name": "alice", "password_hash": HASH, "groups": ["staff"]}],
        "categories": {"adult": {"domains": ["adult.test"]}},
        "applications": [{"name": "app", "hosts": ["*.app.test"]}],
        "dlp": {"detectors": [{"name": "d", "type": "keyword", "patterns": ["x"], "action": "log"}]},
    }


def with_rule(**fields: Any) -> dict[str, Any]:
    doc = base()
    doc["access"]["rules"][0].update(fields)
    return doc


def with_section(name: str, value: Any) -> dict[str, Any]:
    doc = base()
    doc[name] = value
    return doc


def with_detector(**fields: Any) -> dict[str, Any]:
    doc = base()
    doc["dlp"]["detectors"] = [{"name": "d", **fields}]
    return doc


R = "access.rules[0] (r)"

ERRORS = [
    ("not an object", [1, 2], "(document)", "must be an object, not a list"),
    ("format missing", {"access": {"default_action": "deny"}}, "format", "is required"),
    ("wrong format", with_section("format", "safesquid-policy/2"), "format", "must be 'safesquid-policy/1'"),
    ("unknown top-level key", with_section("acess", {}), "acess", "unknown key"),
    ("access missing", {"format": "safesquid-policy/1"}, "access", "is required"),
    ("default action", with_section("access", {"default_action": "block"}), "access.default_action", "'allow' or 'deny'"),
    ("default action missing", with_section("access", {"rules": []}), "access.default_action", "is required"),
    ("rules not a list", with_section("access", {"default_action": "deny", "rules": {}}), "access.rules", "must be a list"),
    ("rule not an object", with_section("access", {"default_action": "deny", "rules": ["r"]}), "access.rules[0]",
     "must be an object"),
    ("rule name missing", with_section("access", {"default_action": "deny", "rules": [{"action": "deny"}]}),
     "access.rules[0].name", "is required"),
    ("rule name not a string", with_section("access", {"default_action": "deny", "rules": [{"name": 3, "action": "deny"}]}),
     "access.rules[0].name", "must be a string, not an integer"),
    ("rule name blank", with_section("access", {"default_action": "deny", "rules": [{"name": " ", "action": "deny"}]}),
     "access.rules[0].name", "must not be empty"),
    ("duplicate rule names", with_section("access", {"default_action": "deny", "rules": [
        {"name": "r", "action": "deny"}, {"name": "r", "action": "allow"}]}),
     "access.rules[1] (r).name", "'r' is used twice (also access.rules[0])"),
    ("unknown rule key", with_rule(domain=["a.test"]), f"{R}.domain", "unknown key"),
    ("action missing", with_section("access", {"default_action": "deny", "rules": [{"name": "r"}]}),
     f"{R}.action", "is required"),
    ("bad action", with_rule(action="block"), f"{R}.action", "'allow' or 'deny'"),
    ("enabled not boolean", with_rule(enabled="yes"), f"{R}.enabled", "must be true or false"),
    ("reason not a string", with_rule(reason=5), f"{R}.reason", "must be a string"),
    ("bare wildcard", with_rule(domains=["ok.test", "*."]), f"{R}.domains[1]", "'*.' is not a domain"),
    ("inner wildcard", with_rule(domains=["a.*.test"]), f"{R}.domains[0]", "only allowed as a leading"),
    ("label starting with a dash", with_rule(domains=["-a.test"]), f"{R}.domains[0]", "bad label '-a'"),
    ("empty label", with_rule(domains=["a..test"]), f"{R}.domains[0]", "bad label ''"),
    ("label too long", with_rule(domains=["a" * 64 + ".test"]), f"{R}.domains[0]", "bad label"),
    ("bad IPv4 literal", with_rule(domains=["999.1.1.1"]), f"{R}.domains[0]", "neither a domain nor an IPv4"),
    ("wildcard IP", with_rule(domains=["*.10.0.0.1"]), f"{R}.domains[0]", "cannot have a '*.' wildcard"),
    ("domain not a string", with_rule(domains=[7]), f"{R}.domains[0]", "must be a string"),
    ("empty condition", with_rule(domains=[]), f"{R}.domains", "must not be empty"),
    ("condition not a list", with_rule(domains="a.test"), f"{R}.domains", "must be a list, not a string"),
    ("duplicate domain", with_rule(domains=["a.test", "A.test."]), f"{R}.domains[1]", "listed twice (also at [0])"),
    ("prefix too long", with_rule(clients=["10.0.0.0/33"]), f"{R}.clients[0]", "not an IP address or CIDR"),
    ("host bits set", with_rule(clients=["10.0.0.1/8"]), f"{R}.clients[0]", "has host bits set"),
    ("not an address", with_rule(clients=["office"]), f"{R}.clients[0]", "'office' is not an IP address"),
    ("port zero", with_rule(ports=[0]), f"{R}.ports[0]", "is not a port"),
    ("port too high", with_rule(ports=[70000]), f"{R}.ports[0]", "is not a port"),
    ("port as a string", with_rule(ports=["80"]), f"{R}.ports[0]", "write single ports as numbers"),
    ("reversed range", with_rule(ports=["90-80"]), f"{R}.ports[0]", "1 <= low <= high <= 65535"),
    ("range past the end", with_rule(ports=["80-65536"]), f"{R}.ports[0]", "1 <= low <= high <= 65535"),
    ("port true", with_rule(ports=[True]), f"{R}.ports[0]", "is not a port"),
    ("method with a blank", with_rule(methods=["GE T"]), f"{R}.methods[0]", "is not an HTTP method"),
    ("url pattern not a string", with_rule(url_patterns=[5]), f"{R}.url_patterns[0]", "must be a string"),
    ("undefined user", with_rule(users=["bob"]), f"{R}.users[0]", "user 'bob' is not defined"),
    ("undefined group", with_rule(groups=["admins"]), f"{R}.groups[0]", "group 'admins' is not defined"),
    ("undefined category", with_rule(categories=["games"]), f"{R}.categories[0]", "category 'games' is not defined"),
    ("undefined application", with_rule(applications=["chat"]), f"{R}.applications[0]",
     "application 'chat' is not defined"),
    ("schedule not an object", with_rule(schedule=["mon"]), f"{R}.schedule", "must be an object"),
    ("unknown schedule key", with_rule(schedule={"day": ["mon"]}), f"{R}.schedule.day", "unknown key"),
    ("bad day", with_rule(schedule={"days": ["mon", "funday"]}), f"{R}.schedule.days[1]", "'funday' is not a day"),
    ("no days", with_rule(schedule={"days": []}), f"{R}.schedule.days", "must not be empty"),
    ("hour 25", with_rule(schedule={"from": "25:00"}), f"{R}.schedule.from", "'25:00' is not a time"),
    ("one-digit hour", with_rule(schedule={"from": "9:00"}), f"{R}.schedule.from", "'9:00' is not a time"),
    ("from 24:00", with_rule(schedule={"from": "24:00"}), f"{R}.schedule.from", "00:00 to 23:59"),
    ("to 24:30", with_rule(schedule={"to": "24:30"}), f"{R}.schedule.to", "00:00 to 24:00"),
    ("empty window", with_rule(schedule={"from": "08:00", "to": "08:00"}), f"{R}.schedule.to", "equals 'from'"),
    ("unknown time zone", with_rule(schedule={"timezone": "Mars/Olympus_Mons"}), f"{R}.schedule.timezone",
     "not a known IANA time zone"),
    ("time zone path escape", with_rule(schedule={"timezone": "../etc/passwd"}), f"{R}.schedule.timezone",
     "not a known IANA time zone"),
    ("authentication not an object", with_section("authentication", True), "authentication", "must be an object"),
    ("enabled not boolean", with_section("authentication", {"enabled": 1}), "authentication.enabled",
     "must be true or false, not an integer"),
    ("realm with a quote", with_section("authentication", {"realm": 'a"b'}), "authentication.realm", "quotes"),
    ("bad exempt network", with_section("authentication", {"exempt_networks": ["127.0.0.0/8", "::1/200"]}),
     "authentication.exempt_networks[1]", "not an IP address or CIDR"),
    ("duplicate group", with_section("groups", [{"name": "staff"}, {"name": "staff"}]), "groups[1] (staff).name",
     "used twice"),
    ("unknown group key", with_section("groups", [{"name": "staff", "members": []}]), "groups[0] (staff).members",
     "unknown key"),
    ("user in an undefined group", with_section("users", [{"name": "alice", "password_hash": HASH, "groups": ["ops"]}]),
     "users[0] (alice).groups[0]", "group 'ops' is not defined"),
    ("password hash missing", with_section("users", [{"name": "alice"}]), "users[0] (alice).password_hash", "is required"),
    ("bcrypt hash", with_section("users", [{"name": "alice", "password_hash": "$2b$12$" + "a" * 53}]),
     "users[0] (alice).password_hash", "must be an argon2id hash"),
    ("argon2i hash", with_section("users", [{"name": "alice", "password_hash": HASH.replace("argon2id", "argon2i")}]),
     "users[0] (alice).password_hash", "must be an argon2id hash"),
    ("plain text password", with_section("users", [{"name": "alice", "password_hash": "secret"}]),
     "users[0] (alice).password_hash", "python -m safesquid_tw.policy.hashpw"),
    ("malformed argon2id hash", with_section("users", [{"name": "alice", "password_hash": "$argon2id$v=19$garbage"}]),
     "users[0] (alice).password_hash", "not a well-formed argon2id hash"),
    ("too costly hash", with_section("users", [{"name": "alice",
                                                "password_hash": HASH.replace("m=8,t=1", "m=4194304,t=1")}]),
     "users[0] (alice).password_hash", "too costly"),
    ("user name with a colon", with_section("users", [{"name": "a:b", "password_hash": HASH}]), "users[0] (a:b).name",
     "must not contain ':'"),
    ("categories not an object", with_section("categories", ["adult"]), "categories", "must be an object"),
    ("unknown category key", with_section("categories", {"adult": {"hosts": []}}), "categories.adult.hosts",
     "unknown key"),
    ("bad category domain", with_section("categories", {"adult": {"domains": ["ok.test", "bad domain"]}}),
     "categories.adult.domains[1]", "is not a domain"),
    ("application hosts missing", with_section("applications", [{"name": "app"}]), "applications[0] (app).hosts",
     "is required"),
    ("application header in capitals", with_section("applications", [
        {"name": "app", "hosts": ["a.test"], "headers": {"User-Agent": "x*"}}]),
     "applications[0] (app).headers.User-Agent", "lower case ('user-agent')"),
    ("application headers empty", with_section("applications", [{"name": "app", "hosts": ["a.test"], "headers": {}}]),
     "applications[0] (app).headers", "non-empty object"),
    ("application path not a string", with_section("applications", [
        {"name": "app", "hosts": ["a.test"], "paths": [None]}]),
     "applications[0] (app).paths[0]", "must be a string, not null"),
    ("connect port as a string", with_section("connect", {"allowed_ports": ["443"]}), "connect.allowed_ports[0]",
     "is not a port"),
    ("connect port range", with_section("connect", {"allowed_ports": [443, 0]}), "connect.allowed_ports[1]",
     "is not a port"),
    ("MIME type without subtype", with_section("content_security", {"blocked_mime_types": ["exe"]}),
     "content_security.blocked_mime_types[0]", "not a MIME type pattern"),
    ("MIME type all wildcards", with_section("content_security", {"blocked_mime_types": ["*/*"]}),
     "content_security.blocked_mime_types[0]", "not a MIME type pattern"),
    ("MIME subtype with a blank", with_section("content_security", {"blocked_mime_types": ["video/x y"]}),
     "content_security.blocked_mime_types[0]", "not a MIME type pattern"),
    ("extension with a dot", with_section("content_security", {"blocked_extensions": [".exe"]}),
     "content_security.blocked_extensions[0]", "without the dot"),
    ("negative size", with_section("content_security", {"max_upload_bytes": -1}),
     "content_security.max_upload_bytes", "at least 0"),
    ("size as a string", with_section("content_security", {"max_download_bytes": "10"}),
     "content_security.max_download_bytes", "must be an integer or null, not a string"),
    ("size as a fraction", with_section("content_security", {"max_download_bytes": 1.5}),
     "content_security.max_download_bytes", "not a number"),
    ("scan limit zero", with_section("dlp", {"scan_limit_bytes": 0}), "dlp.scan_limit_bytes", "at least 1"),
    ("unknown detector type", with_detector(type="ml", action="log"), "dlp.detectors[0] (d).type",
     "keyword, regex, card_number"),
    ("unknown detector action", with_detector(type="card_number", action="quarantine"), "dlp.detectors[0] (d).action",
     "'block' or 'log'"),
    ("detector action missing", with_detector(type="card_number"), "dlp.detectors[0] (d).action", "is required"),
    ("invalid regex", with_detector(type="regex", patterns=["ok", "(unclosed"], action="log"),
     "dlp.detectors[0] (d).patterns[1]", "missing ), unterminated subpattern"),
    ("keyword without patterns", with_detector(type="keyword", action="log"), "dlp.detectors[0] (d).patterns",
     "is required for a keyword detector"),
    ("card detector with patterns", with_detector(type="card_number", patterns=["x"], action="block"),
     "dlp.detectors[0] (d).patterns", "takes no patterns"),
    ("empty keyword", with_detector(type="keyword", patterns=[""], action="log"), "dlp.detectors[0] (d).patterns[0]",
     "must not be empty"),
]


@pytest.mark.parametrize("doc, path, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_names_path_and_problem(doc: Any, path: str, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        validate_document(doc)
    assert raised.value.path == path
    assert message in raised.value.message
    assert str(raised.value) == f"{path}: {raised.value.message}"


@pytest.mark.parametrize("data, message", [
    (b'{"format": }', r"line 1 column 12: Expecting value"),
    (b'{\n  "format": "safesquid-policy/1",\n  "access": {"default_action": "deny",}\n}',
     r"line 3 column 39: Expecting property name"),
    (b'{"format": "a", "format": "b"}', r"the key 'format' appears twice"),
    (b'{"format": NaN}', r"NaN is not a JSON value"),
    (b'\xff\xfe{}', r"is not UTF-8 text"),
    (b"[" * 100000, r"nested too deeply|line 1 column"),
])
def test_bytes_that_are_no_json_document(data: bytes, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy_bytes(data, 1)
    assert raised.value.path == "(document)"
    assert re.search(message, raised.value.message)


def test_defaults_are_filled_in() -> None:
    canonical = validate_document({"format": "safesquid-policy/1", "access": {"default_action": "allow",
                                                                             "rules": [{"name": "r", "action": "deny",
                                                                                        "schedule": {}}]}})
    assert canonical == {
        "format": "safesquid-policy/1",
        "comment": "",
        "access": {"default_action": "allow", "rules": [{
            "name": "r", "action": "deny", "reason": "", "enabled": True,
            "schedule": {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "from": "00:00", "to": "24:00"},
        }]},
        "authentication": {"enabled": False, "realm": "safesquid-tw", "exempt_networks": []},
        "groups": [],
        "users": [],
        "categories": {},
        "applications": [],
        "connect": {"allowed_ports": [443]},
        "content_security": {"blocked_mime_types": [], "blocked_extensions": [], "max_upload_bytes": None,
                             "max_download_bytes": None},
        "dlp": {"scan_limit_bytes": 1048576, "detectors": []},
    }


def test_validation_is_idempotent_and_leaves_its_input_alone() -> None:
    doc = base()
    before = copy.deepcopy(doc)
    canonical = validate_document(doc)
    assert doc == before
    assert validate_document(canonical) == canonical


def test_canonical_bytes_do_not_depend_on_key_order_or_spacing() -> None:
    doc = base()
    reordered = json.loads(json.dumps(doc, indent=4, sort_keys=True))
    reordered = dict(reversed(list(reordered.items())))
    assert canonical_bytes(validate_document(doc)) == canonical_bytes(validate_document(reordered))
    assert digest(validate_document(doc)) == digest(validate_document(reordered))


def test_canonical_bytes_form() -> None:
    data = canonical_bytes({"b": 1, "a": ["é", None]})
    assert data == '{"a":["é",null],"b":1}'.encode()


def test_digest_form_and_sensitivity() -> None:
    first = digest(validate_document(base()))
    changed = base()
    changed["access"]["rules"][0]["action"] = "allow"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first)
    assert digest(validate_document(changed)) != first


def test_loaded_policy_carries_version_digest_and_document() -> None:
    policy = load_policy_bytes(json.dumps(base()).encode(), 4)
    assert policy.version == 4
    assert policy.digest == digest(policy.document)
    assert policy.document == validate_document(base())


@pytest.mark.parametrize("fields", [
    {"domains": ["*.example.com", "bücher.example", "[2001:db8::1]", "10.0.0.1", "under_score.test", "trailing.test."]},
    {"clients": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "::1"]},
    {"ports": [80, "8000-8100", "1-65535"]},
    {"methods": ["GET", "PROPFIND", "connect"]},
    {"url_patterns": ["*/ads/*", "*.swf", "[ab]*"]},
    {"schedule": {"days": ["sat", "sun"], "from": "22:00", "to": "06:00", "timezone": "Europe/Berlin"}},
    {"users": ["alice"], "groups": ["staff"], "categories": ["adult"], "applications": ["app"]},
])
def test_valid_rule_conditions(fields: dict[str, Any]) -> None:
    rule = validate_document(with_rule(**fields))["access"]["rules"][0]
    for key, value in fields.items():
        assert rule[key] == value


def test_valid_sections() -> None:
    doc = base()
    doc["content_security"] = {"blocked_mime_types": ["application/x-msdownload", "video/*"],
                               "blocked_extensions": ["exe", "MSI"], "max_upload_bytes": 0, "max_download_bytes": None}
    doc["dlp"] = {"scan_limit_bytes": 4096, "detectors": [
        {"name": "ssn", "type": "regex", "patterns": [r"\b\d{3}-\d{2}-\d{4}\b"], "action": "log"},
        {"name": "cards", "type": "card_number", "action": "block"}]}
    doc["applications"] = [{"name": "app", "hosts": ["a.test"], "paths": ["/api/*"], "headers": {"user-agent": "X*"}}]
    canonical = validate_document(doc)
    assert canonical["content_security"] == doc["content_security"]
    assert canonical["dlp"] == doc["dlp"]
    assert canonical["applications"][0]["headers"] == {"user-agent": "X*"}


# -- access_restriction ---------------------------------------------------------------------------

AR = "access_restriction"


@pytest.mark.parametrize("value, path, message", [
    ([], AR, "must be an object, not a list"),
    ({"portal": []}, f"{AR}.portal", "unknown key"),
    ({"portal_allow": "10.0.0.0/8"}, f"{AR}.portal_allow", "must be a list"),
    ({"portal_allow": ["10.0.0.0/33"]}, f"{AR}.portal_allow[0]", "is not an IP address or CIDR network"),
    ({"portal_allow": ["10.0.0.1/8"]}, f"{AR}.portal_allow[0]", "has host bits set"),
    ({"slave_allow": ["192.0.2.7", "192.0.2.7/32"]}, f"{AR}.slave_allow[1]", "is listed twice"),
    ({"slave_allow": ["2001:db8::1", "2001:DB8:0::1"]}, f"{AR}.slave_allow[1]", "is listed twice"),
    ({"slave_allow_enabled": "yes"}, f"{AR}.slave_allow_enabled", "must be true or false"),
])
def test_access_restriction_errors(value: Any, path: str, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        validate_document(with_section(AR, value))
    assert raised.value.path == path
    assert message in raised.value.message


@pytest.mark.parametrize("value, expected", [
    ({"portal_allow": ["10.0.0.0/8", "::1"]},
     {"portal_allow": ["10.0.0.0/8", "::1"], "slave_allow": [], "slave_allow_enabled": False}),
    ({"slave_allow": ["192.0.2.0/24"], "slave_allow_enabled": True},
     {"portal_allow": [], "slave_allow": ["192.0.2.0/24"], "slave_allow_enabled": True}),
    ({"slave_allow_enabled": True}, {"portal_allow": [], "slave_allow": [], "slave_allow_enabled": True}),
])
def test_access_restriction_is_kept_with_defaults_filled_in(value: Any, expected: dict[str, Any]) -> None:
    canonical = validate_document(with_section(AR, value))
    assert canonical[AR] == expected
    assert validate_document(canonical) == canonical


@pytest.mark.parametrize("value", [
    {},
    {"portal_allow": [], "slave_allow": [], "slave_allow_enabled": False},
    {"slave_allow": []},
])
def test_access_restriction_of_defaults_only_leaves_the_digest_alone(value: Any) -> None:
    # Documents written before the section existed keep their digest: a section holding only
    # defaults is left out of the canonical form.
    canonical = validate_document(with_section(AR, value))
    assert AR not in canonical
    assert digest(canonical) == digest(validate_document(base()))
