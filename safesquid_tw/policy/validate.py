"""The shape of a policy document: every section, item and field, with defaults filled in.

`validate_document` either returns the canonical document (the same content, unknown nothing,
every optional section and field present with its default) or raises PolicyError naming the
first wrong field. Cross references (groups, users, categories, applications) are checked here,
so a compiled policy never meets a dangling name.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from safesquid_tw.policy.directoryfields import check_directory, check_directory_groups
from safesquid_tw.policy.antivirus import DEFAULTS as ANTIVIRUS_DEFAULTS
from safesquid_tw.policy.antivirus import validate_antivirus
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import (
    DAYS,
    check_day,
    check_domain,
    check_extension,
    check_header_name,
    check_method,
    check_mime_pattern,
    check_name,
    check_network,
    check_password_hash,
    check_port,
    check_regex,
    check_shell_pattern,
    check_single_port,
    check_time,
    check_timezone,
    check_unique_list,
    expect_bool,
    expect_int,
    expect_list,
    expect_object,
    expect_str,
    time_to_minutes,
)
from safesquid_tw.policy.hosts import parse_domain_pattern
from safesquid_tw.policy.incremental import SectionMemo
from safesquid_tw.policy.model import ACTIONS
from safesquid_tw.policy.tlsinspection import DEFAULTS as TLS_INSPECTION_DEFAULTS
from safesquid_tw.policy.tlsinspection import validate_tls_inspection
from safesquid_tw.policy.tlsrules import check_tls_mode

FORMAT = "safesquid-policy/1"
DEFAULT_REALM = "safesquid-tw"
DEFAULT_SCAN_LIMIT = 1048576
MAX_SCAN_LIMIT = 64 * 1048576
DETECTOR_TYPES = ("keyword", "regex", "card_number")
DLP_ACTIONS = ("block", "log")
ACCESS_RESTRICTION_DEFAULTS: dict[str, Any] = {"portal_allow": [], "slave_allow": [], "slave_allow_enabled": False}

_TOP = {"format": True, "comment": False, "access": True, "authentication": False, "groups": False,
        "users": False, "categories": False, "applications": False, "connect": False,
        "content_security": False, "dlp": False, "access_restriction": False, "forwarding": False,
        "tls_inspection": False, "antivirus": False}
_RULE = {"name": True, "action": True, "reason": False, "enabled": False, "clients": False,
         "users": False, "groups": False, "domains": False, "url_patterns": False, "methods": False,
         "ports": False, "categories": False, "applications": False, "schedule": False,
         "tls": False}


def _domain_key(pattern: str) -> tuple[bool, str]:
    return parse_domain_pattern(pattern)


def _fold(text: str) -> str:
    return text.casefold()


def validate_document(doc: object, memo: SectionMemo | None = None) -> dict[str, Any]:
    """Check a whole policy document; return its canonical form or raise PolicyError.

    With a `memo` (policy/incremental.py), the big sections that are the same as when last
    validated are taken from it instead of being checked again."""
    top = expect_object(doc, "(document)", _TOP)
    if top["format"] != FORMAT:
        raise PolicyError("format", f"must be {FORMAT!r}, not {top['format']!r}")
    check = memo.validate if memo is not None else _check_now
    groups = check("groups", top.get("groups", []), _groups)
    group_names = {g["name"] for g in groups}
    users = check("users", top.get("users", []), lambda v: _users(v, group_names), frozenset(group_names))
    categories = check("categories", top.get("categories", {}), _categories)
    applications = check("applications", top.get("applications", []), _applications)
    known = {
        "groups": group_names,
        "users": {u["name"] for u in users},
        "categories": set(categories),
        "applications": {a["name"] for a in applications},
    }
    canonical = {
        "format": FORMAT,
        "comment": expect_str(top.get("comment", ""), "comment", max_len=65536, allow_empty=True),
        "access": check("access", top["access"], lambda v: _access(v, known),
                        tuple(frozenset(known[k]) for k in sorted(known))),
        "authentication": _authentication(top.get("authentication", {})),
        "groups": groups,
        "users": users,
        "categories": categories,
        "applications": applications,
        "connect": _connect(top.get("connect", {})),
        "content_security": _content_security(top.get("content_security", {})),
        "dlp": _dlp(top.get("dlp", {})),
    }
    restriction = _access_restriction(top.get("access_restriction", {}))
    if restriction != ACCESS_RESTRICTION_DEFAULTS:
        # The one section left out while it holds only its defaults: documents written before
        # it existed keep their canonical bytes, so their digests (and every cache and
        # history file that records one) stay valid.
        canonical["access_restriction"] = restriction
    forwarding = _forwarding(top.get("forwarding", {}))
    if forwarding != FORWARDING_DEFAULTS:
        # Left out while it holds only its defaults, like access_restriction: older documents
        # keep their canonical bytes and digests.
        canonical["forwarding"] = forwarding
    tls_inspection = validate_tls_inspection(top.get("tls_inspection", {}), known["categories"])
    if tls_inspection != TLS_INSPECTION_DEFAULTS:
        # Left out while it holds only its defaults, like access_restriction (digests stay put).
        canonical["tls_inspection"] = tls_inspection
    antivirus = validate_antivirus(top.get("antivirus", {}))
    if antivirus != ANTIVIRUS_DEFAULTS:
        # Left out while it holds only its defaults, like access_restriction (digests stay valid).
        canonical["antivirus"] = antivirus
    return canonical


def _check_now(_name: str, raw: Any, check: Any, _context: Any = None) -> Any:
    return check(raw)


def _named_items(value: object, path: str) -> list[tuple[str, dict[str, Any], str]]:
    """For lists of named objects: (item path with its name, item, name), refusing repeated names."""
    items = expect_list(value, path)
    seen: dict[str, int] = {}
    out = []
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        if not isinstance(item, dict):
            expect_object(item, item_path, {})
        if "name" not in item:
            raise PolicyError(f"{item_path}.name", "is required")
        name = check_name(item["name"], f"{item_path}.name")
        labelled = f"{item_path} ({name})"
        if name in seen:
            raise PolicyError(f"{labelled}.name", f"{name!r} is used twice (also {path}[{seen[name]}])")
        seen[name] = i
        out.append((labelled, item, name))
    return out


def _references(value: object, path: str, defined: set[str], what: str) -> list[str]:
    def check(item: object, item_path: str) -> str:
        name = expect_str(item, item_path, max_len=64)
        if name not in defined:
            raise PolicyError(item_path, f"{what} {name!r} is not defined")
        return name

    return check_unique_list(expect_list(value, path, non_empty=True), path, check)


def _access(value: object, known: dict[str, set[str]]) -> dict[str, Any]:
    section = expect_object(value, "access", {"default_action": True, "rules": False})
    default = section["default_action"]
    if default not in ACTIONS:
        raise PolicyError("access.default_action", f"must be 'allow' or 'deny', not {default!r}")
    rules = [_rule(path, item, name, known) for path, item, name in _named_items(section.get("rules", []), "access.rules")]
    return {"default_action": default, "rules": rules}


def _rule(path: str, item: dict[str, Any], name: str, known: dict[str, set[str]]) -> dict[str, Any]:
    expect_object(item, path, _RULE)
    action = item["action"]
    if action not in ACTIONS:
        raise PolicyError(f"{path}.action", f"must be 'allow' or 'deny', not {action!r}")
    rule: dict[str, Any] = {
        "name": name,
        "action": action,
        "reason": expect_str(item.get("reason", ""), f"{path}.reason", max_len=1000, allow_empty=True),
        "enabled": expect_bool(item.get("enabled", True), f"{path}.enabled"),
    }

    def listed(key: str, checker: Any, fold: Any = lambda v: v) -> None:
        if key in item:
            field = f"{path}.{key}"
            rule[key] = check_unique_list(expect_list(item[key], field, non_empty=True), field, checker, fold)

    listed("clients", check_network)
    listed("domains", check_domain, _domain_key)
    listed("url_patterns", check_shell_pattern, _fold)
    listed("methods", check_method, str.upper)
    listed("ports", check_port)
    for key, what in (("users", "user"), ("groups", "group"), ("categories", "category"),
                      ("applications", "application")):
        if key in item:
            rule[key] = _references(item[key], f"{path}.{key}", known[key], what)
    if "schedule" in item:
        rule["schedule"] = _schedule(item["schedule"], f"{path}.schedule")
    listed("tls", check_tls_mode, str.lower)
    return rule


def _schedule(value: object, path: str) -> dict[str, Any]:
    section = expect_object(value, path, {"days": False, "from": False, "to": False, "timezone": False})
    days_path = f"{path}.days"
    days = check_unique_list(expect_list(section.get("days", list(DAYS)), days_path, non_empty=True), days_path, check_day)
    start = check_time(section.get("from", "00:00"), f"{path}.from", end=False)
    end = check_time(section.get("to", "24:00"), f"{path}.to", end=True)
    if time_to_minutes(start) == time_to_minutes(end):
        raise PolicyError(f"{path}.to", f"equals 'from' ({start}): the window would be empty or ambiguous; "
                          "leave out 'from' and 'to' for the whole day")
    out: dict[str, Any] = {"days": days, "from": start, "to": end}
    if "timezone" in section:
        out["timezone"] = check_timezone(section["timezone"], f"{path}.timezone")
    return out


def _authentication(value: object) -> dict[str, Any]:
    section = expect_object(value, "authentication", {"enabled": False, "realm": False, "exempt_networks": False,
                                                      "directory": False, "negotiate": False})
    realm = expect_str(section.get("realm", DEFAULT_REALM), "authentication.realm", max_len=128)
    if '"' in realm or "\\" in realm or any(not ch.isprintable() for ch in realm):
        raise PolicyError("authentication.realm", "must not contain quotes, backslashes or control characters")
    exempt = expect_list(section.get("exempt_networks", []), "authentication.exempt_networks")
    out = {
        "enabled": expect_bool(section.get("enabled", False), "authentication.enabled"),
        "realm": realm,
        "exempt_networks": check_unique_list(exempt, "authentication.exempt_networks", check_network),
    }
    # Directory identity keys appear only when used, so documents without them keep their digest.
    directory = check_directory(section.get("directory"))
    if directory is not None:
        out["directory"] = directory
    if expect_bool(section.get("negotiate", False), "authentication.negotiate"):
        out["negotiate"] = True
    return out


def _groups(value: object) -> list[dict[str, Any]]:
    out = []
    for path, item, name in _named_items(value, "groups"):
        expect_object(item, path, {"name": True, "description": False, "directory_groups": False})
        description = expect_str(item.get("description", ""), f"{path}.description", max_len=1000, allow_empty=True)
        directory_groups = check_directory_groups(item.get("directory_groups", []), f"{path}.directory_groups")
        group = {"name": name, "description": description}
        if directory_groups:
            group["directory_groups"] = directory_groups
        out.append(group)
    return out


def _users(value: object, group_names: set[str]) -> list[dict[str, Any]]:
    out = []
    for path, item, name in _named_items(value, "users"):
        expect_object(item, path, {"name": True, "password_hash": True, "groups": False})
        if ":" in name:
            # HTTP Basic credentials are "user:password": a colon in the name cannot be sent.
            raise PolicyError(f"{path}.name", "must not contain ':'")
        groups = item.get("groups", [])
        member_of = _references(groups, f"{path}.groups", group_names, "group") if groups != [] else []
        out.append({
            "name": name,
            "password_hash": check_password_hash(item["password_hash"], f"{path}.password_hash"),
            "groups": member_of,
        })
    return out


def _categories(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        expect_object(value, "categories", {})
    out = {}
    for name, item in value.items():
        path = f"categories.{name}"
        check_name(name, path)
        expect_object(item, path, {"description": False, "domains": False})
        domains_path = f"{path}.domains"
        domains = expect_list(item.get("domains", []), domains_path)
        out[name] = {
            "description": expect_str(item.get("description", ""), f"{path}.description", max_len=1000, allow_empty=True),
            "domains": check_unique_list(domains, domains_path, check_domain, _domain_key),
        }
    return out


def _applications(value: object) -> list[dict[str, Any]]:
    out = []
    for path, item, name in _named_items(value, "applications"):
        expect_object(item, path, {"name": True, "description": False, "hosts": True, "paths": False, "headers": False})
        hosts_path = f"{path}.hosts"
        app: dict[str, Any] = {
            "name": name,
            "description": expect_str(item.get("description", ""), f"{path}.description", max_len=1000, allow_empty=True),
            "hosts": check_unique_list(expect_list(item["hosts"], hosts_path, non_empty=True), hosts_path, check_domain, _domain_key),
        }
        if "paths" in item:
            paths_path = f"{path}.paths"
            app["paths"] = check_unique_list(expect_list(item["paths"], paths_path, non_empty=True), paths_path, check_shell_pattern)
        if "headers" in item:
            headers = item["headers"]
            headers_path = f"{path}.headers"
            if not isinstance(headers, dict) or not headers:
                raise PolicyError(headers_path, "must be a non-empty object of header name to pattern")
            app["headers"] = {
                check_header_name(header, f"{headers_path}.{header}"): check_shell_pattern(pattern, f"{headers_path}.{header}")
                for header, pattern in headers.items()
            }
        out.append(app)
    return out


def _connect(value: object) -> dict[str, Any]:
    section = expect_object(value, "connect", {"allowed_ports": False})
    ports = expect_list(section.get("allowed_ports", [443]), "connect.allowed_ports")
    return {"allowed_ports": check_unique_list(ports, "connect.allowed_ports", check_single_port)}


def _content_security(value: object) -> dict[str, Any]:
    path = "content_security"
    section = expect_object(value, path, {"blocked_mime_types": False, "blocked_extensions": False,
                                          "max_upload_bytes": False, "max_download_bytes": False})
    mime_path, ext_path = f"{path}.blocked_mime_types", f"{path}.blocked_extensions"
    return {
        "blocked_mime_types": check_unique_list(
            expect_list(section.get("blocked_mime_types", []), mime_path), mime_path, check_mime_pattern, str.lower),
        "blocked_extensions": check_unique_list(
            expect_list(section.get("blocked_extensions", []), ext_path), ext_path, check_extension, str.lower),
        "max_upload_bytes": expect_int(section.get("max_upload_bytes"), f"{path}.max_upload_bytes", minimum=0, nullable=True),
        "max_download_bytes": expect_int(section.get("max_download_bytes"), f"{path}.max_download_bytes", minimum=0, nullable=True),
    }


def _access_restriction(value: object) -> dict[str, Any]:
    path = "access_restriction"
    section = expect_object(value, path, {"portal_allow": False, "slave_allow": False, "slave_allow_enabled": False})

    def networks(key: str) -> list[str]:
        field = f"{path}.{key}"
        return check_unique_list(expect_list(section.get(key, []), field), field, check_network, _network_key)

    return {
        "portal_allow": networks("portal_allow"),
        "slave_allow": networks("slave_allow"),
        "slave_allow_enabled": expect_bool(section.get("slave_allow_enabled", False), f"{path}.slave_allow_enabled"),
    }


def _network_key(text: str) -> object:
    # "10.0.0.1" and "10.0.0.1/32" are one network, as are two spellings of an IPv6 address.
    return ipaddress.ip_network(text, strict=True)


def _dlp(value: object) -> dict[str, Any]:
    section = expect_object(value, "dlp", {"scan_limit_bytes": False, "detectors": False})
    detectors = []
    for path, item, name in _named_items(section.get("detectors", []), "dlp.detectors"):
        expect_object(item, path, {"name": True, "type": True, "patterns": False, "action": True})
        kind, action = item["type"], item["action"]
        if kind not in DETECTOR_TYPES:
            raise PolicyError(f"{path}.type", f"must be one of {', '.join(DETECTOR_TYPES)}, not {kind!r}")
        if action not in DLP_ACTIONS:
            raise PolicyError(f"{path}.action", f"must be 'block' or 'log', not {action!r}")
        detector: dict[str, Any] = {"name": name, "type": kind, "action": action}
        patterns_path = f"{path}.patterns"
        if kind == "card_number":
            if "patterns" in item:
                raise PolicyError(patterns_path, "a card_number detector takes no patterns")
        else:
            if "patterns" not in item:
                raise PolicyError(patterns_path, f"is required for a {kind} detector")
            checker = check_regex if kind == "regex" else expect_str
            fold = (lambda v: v) if kind == "regex" else _fold
            detector["patterns"] = check_unique_list(
                expect_list(item["patterns"], patterns_path, non_empty=True), patterns_path, checker, fold)
        detectors.append(detector)
    limit = expect_int(section.get("scan_limit_bytes", DEFAULT_SCAN_LIMIT), "dlp.scan_limit_bytes",
                       minimum=1, maximum=MAX_SCAN_LIMIT)
    return {"scan_limit_bytes": limit, "detectors": detectors}


__all__ = ["ACCESS_RESTRICTION_DEFAULTS", "DETECTOR_TYPES", "DLP_ACTIONS", "FORMAT", "validate_document"]


FORWARDING_DEFAULTS: dict[str, Any] = {"x_forwarded_for": "append", "trusted_downstream": []}


def _forwarding(value: object) -> dict[str, Any]:
    from safesquid_tw.policy.forwarding import MODES

    path = "forwarding"
    section = expect_object(value, path, {"x_forwarded_for": False, "trusted_downstream": False})
    mode = expect_str(section.get("x_forwarded_for", "append"), f"{path}.x_forwarded_for", max_len=32)
    if mode not in MODES:
        raise PolicyError(f"{path}.x_forwarded_for", f"must be one of {', '.join(MODES)}, not {mode!r}")
    field = f"{path}.trusted_downstream"
    trusted = check_unique_list(expect_list(section.get("trusted_downstream", []), field), field, check_network,
                                _network_key)
    return {"x_forwarded_for": mode, "trusted_downstream": trusted}
