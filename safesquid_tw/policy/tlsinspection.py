"""The `tls_inspection` policy section: its validation and its compiled form.

Which CONNECT tunnels are decrypted (bumped) and which are spliced unchanged, and which origins
may present an invalid certificate. Pure: the proxy asks `inspect(...)` with the tunnel's host
(the CONNECT host, or the SNI when the CONNECT named an IP address), its categories and the
client's address.
"""

from __future__ import annotations

from typing import Any

from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.fields import (
    check_domain,
    check_network,
    check_unique_list,
    expect_bool,
    expect_int,
    expect_list,
    expect_object,
    expect_str,
)
from safesquid_tw.policy.hosts import normalise_host, parse_domain_pattern, suffixes
from safesquid_tw.policy.networks import NetworkSet

SECTION = "tls_inspection"
DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "bypass_domains": [],
    "bypass_categories": [],
    "bypass_clients": [],
    "allow_invalid_upstream_domains": [],
    "auto_bypass_pinned": 0,
}
MAX_AUTO_BYPASS = 1000
_FIELDS = {key: False for key in DEFAULTS}


def validate_tls_inspection(value: object, categories: set[str]) -> dict[str, Any]:
    """The canonical section; categories must be defined in the document."""
    section = expect_object(value, SECTION, _FIELDS)

    def domains(key: str) -> list[str]:
        path = f"{SECTION}.{key}"
        return check_unique_list(expect_list(section.get(key, []), path), path, check_domain, parse_domain_pattern)

    def category(item: object, path: str) -> str:
        name = expect_str(item, path, max_len=64)
        if name not in categories:
            raise PolicyError(path, f"category {name!r} is not defined")
        return name

    cat_path, client_path = f"{SECTION}.bypass_categories", f"{SECTION}.bypass_clients"
    return {
        "enabled": expect_bool(section.get("enabled", False), f"{SECTION}.enabled"),
        "bypass_domains": domains("bypass_domains"),
        "bypass_categories": check_unique_list(expect_list(section.get("bypass_categories", []), cat_path),
                                               cat_path, category),
        "bypass_clients": check_unique_list(expect_list(section.get("bypass_clients", []), client_path),
                                            client_path, check_network),
        "allow_invalid_upstream_domains": domains("allow_invalid_upstream_domains"),
        "auto_bypass_pinned": expect_int(section.get("auto_bypass_pinned", 0), f"{SECTION}.auto_bypass_pinned",
                                         minimum=0, maximum=MAX_AUTO_BYPASS),
    }


class _DomainSet:
    """Membership of a host in a list of domain patterns (exact, or `*.` for a whole subtree)."""

    __slots__ = ("_exact", "_tree")

    def __init__(self, patterns: list[str]) -> None:
        self._exact: set[str] = set()
        self._tree: set[str] = set()
        for pattern in patterns:
            wildcard, name = parse_domain_pattern(pattern)
            (self._tree if wildcard else self._exact).add(name)

    def __contains__(self, host: str) -> bool:
        host = normalise_host(host)
        if host in self._exact:
            return True
        if self._tree:
            return any(suffix in self._tree for suffix in suffixes(host))
        return False

    def __bool__(self) -> bool:
        return bool(self._exact or self._tree)


class TlsInspectionRules:
    """The compiled section. `inspect` answers (bump?, why not) for one tunnel."""

    def __init__(self, section: dict[str, Any] | None) -> None:
        section = section or DEFAULTS
        self.enabled: bool = section["enabled"]
        self._bypass_domains = _DomainSet(section["bypass_domains"])
        self._bypass_categories = frozenset(section["bypass_categories"])
        self._bypass_clients = NetworkSet(section["bypass_clients"])
        self._allow_invalid = _DomainSet(section["allow_invalid_upstream_domains"])
        self.bypass_domain_list: tuple[str, ...] = tuple(section["bypass_domains"])
        # Splice a host for a while after this many rejections of its leaf (0: never).
        self.auto_bypass_pinned: int = section.get("auto_bypass_pinned", 0)

    def inspect(self, host: str, categories: tuple[str, ...], client_ip: str) -> tuple[bool, str | None]:
        """(True, None) to bump; (False, reason) to splice."""
        if not self.enabled:
            return False, "TLS inspection is off"
        if host in self._bypass_domains:
            return False, "bypassed domain"
        for name in categories:
            if name in self._bypass_categories:
                return False, f"bypassed category {name}"
        if client_ip in self._bypass_clients:
            return False, "bypassed client"
        return True, None

    def allows_invalid_certificate(self, host: str) -> bool:
        return bool(self._allow_invalid) and host in self._allow_invalid


def compile_tls_inspection(document: dict[str, Any]) -> TlsInspectionRules:
    return TlsInspectionRules(document.get(SECTION))


__all__ = ["DEFAULTS", "SECTION", "TlsInspectionRules", "compile_tls_inspection", "validate_tls_inspection"]
