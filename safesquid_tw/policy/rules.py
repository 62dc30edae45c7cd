"""Access rules compiled into bit masks, so first-match costs a few look-ups, not a loop over rules.

Rule i is bit i. For every condition kind the table holds, per value, the mask of rules that the
value satisfies (a rule without that condition is satisfied by every value). A request ANDs one
mask per condition kind; the lowest bit left is the first rule in document order whose
look-up-able conditions all hold. Only URL patterns and schedules, which need the full URL or the
clock, are checked rule by rule, and only for the rules that survive the masks.
"""

from __future__ import annotations

import fnmatch
import re
import zoneinfo
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from safesquid_tw.policy.escapes import normal_escapes
from safesquid_tw.policy.fields import DAYS, time_to_minutes
from safesquid_tw.policy.hosts import parse_domain_pattern
from safesquid_tw.policy.networks import Address, NetworkMap

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}


def shell_patterns_regex(patterns: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive regex matching a whole string against any of the shell patterns."""
    # fnmatch.translate anchors each alternative at the end (\Z); .match anchors the start.
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.IGNORECASE)


def required_literal(pattern: str) -> str | None:
    """The longest run of plain characters every string matching the shell `pattern` contains,
    or None when the pattern promises none (only wildcards) or has a `[...]` set, whose inside
    is not literal. Lets one quick search rule out every URL pattern at once (`RuleTable`)."""
    if "[" in pattern or "]" in pattern:
        return None
    longest = max(re.split(r"[*?]", pattern), key=len)
    return longest or None


def full_url(scheme: str, host: str, port: int, path: str) -> str:
    """`scheme://host[:port]/path?query`, the port only when it is not the scheme's default."""
    if ":" in host:
        host = f"[{host}]"
    if _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}{path}"
    return f"{scheme}://{host}:{port}{path}"


class Schedule:
    """Days and a time window in a time zone; a window whose start is after its end spans midnight,
    and its morning part belongs to the day before (fri 22:00-06:00 holds until saturday 06:00)."""

    __slots__ = ("days", "start", "end", "zone")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.days = frozenset(DAYS.index(day) for day in spec["days"])
        self.start = time_to_minutes(spec["from"])
        self.end = time_to_minutes(spec["to"])
        self.zone = zoneinfo.ZoneInfo(spec["timezone"]) if "timezone" in spec else None

    def active(self, now: datetime) -> bool:
        local = now.astimezone(self.zone)  # no zone: the node's local time
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return self.start <= minute < self.end and day in self.days
        if minute >= self.start:
            return day in self.days
        return minute < self.end and (day - 1) % 7 in self.days


class CompiledRule:
    __slots__ = ("name", "action", "reason", "categories", "url_regex", "url_literals", "schedule")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name: str = spec["name"]
        self.action: str = spec["action"]
        verb = "allowed" if self.action == "allow" else "denied"
        self.reason: str = spec["reason"] or f"{verb} by rule {self.name}"
        self.categories: frozenset[str] = frozenset(spec.get("categories", ()))
        patterns = spec.get("url_patterns")
        # Request paths are matched with escapes in one spelling (proxy/urlnorm.py): so are patterns.
        normal = [normal_escapes(p) for p in patterns] if patterns else []
        self.url_regex = shell_patterns_regex(normal) if patterns else None
        literals = [required_literal(p) for p in normal]
        # One literal per pattern that any URL it matches must contain; None if some pattern has none.
        self.url_literals: tuple[str, ...] | None = tuple(literals) if None not in literals else None
        self.schedule = Schedule(spec["schedule"]) if "schedule" in spec else None


class _Dimension:
    """One condition kind: the rules without it, and per value the rules listing that value."""

    __slots__ = ("unconditioned", "by_value")

    def __init__(self) -> None:
        self.unconditioned = 0
        self.by_value: dict[Any, int] = {}

    def add(self, bit: int, values: Iterable[Any] | None) -> None:
        if values is None:
            self.unconditioned |= bit
            return
        for value in values:
            self.by_value[value] = self.by_value.get(value, 0) | bit


class RuleTable:
    """The enabled rules of one policy version, indexed for first-match look-up."""

    def __init__(self, rule_specs: list[dict[str, Any]]) -> None:
        specs = [spec for spec in rule_specs if spec["enabled"]]
        self.rules = tuple(CompiledRule(spec) for spec in specs)
        self.all_rules = (1 << len(specs)) - 1
        exact, wildcard = _Dimension(), _Dimension()
        categories, applications, methods = _Dimension(), _Dimension(), _Dimension()
        users, groups, ports = _Dimension(), _Dimension(), _Dimension()
        tls_modes = _Dimension()
        client_entries: list[tuple[str, int]] = []
        self.unconditioned_clients = 0
        self.port_ranges: list[tuple[int, int, int]] = []
        self.needs_check = 0  # rules with URL patterns or a schedule
        for i, spec in enumerate(specs):
            bit = 1 << i
            if "domains" in spec:
                for pattern in spec["domains"]:
                    is_wildcard, domain = parse_domain_pattern(pattern)
                    (wildcard if is_wildcard else exact).add(bit, [domain])
            else:
                exact.unconditioned |= bit
            categories.add(bit, spec.get("categories"))
            applications.add(bit, spec.get("applications"))
            methods.add(bit, [m.upper() for m in spec["methods"]] if "methods" in spec else None)
            users.add(bit, spec.get("users"))
            groups.add(bit, spec.get("groups"))
            if "ports" in spec:
                for port in spec["ports"]:
                    if isinstance(port, int):
                        ports.add(bit, [port])
                    else:
                        low, high = port.split("-")
                        self.port_ranges.append((int(low), int(high), bit))
            else:
                ports.unconditioned |= bit
            if "clients" in spec:
                client_entries.extend((network, bit) for network in spec["clients"])
            else:
                self.unconditioned_clients |= bit
            if "url_patterns" in spec or "schedule" in spec:
                self.needs_check |= bit
            tls_modes.add(bit, spec.get("tls"))
        # One pass over the URL for all URL-pattern rules together: when no rule's pattern
        # matches (the common case), every such rule drops out at once instead of one regex each.
        url_rules = [(1 << i, rule.url_regex) for i, rule in enumerate(self.rules) if rule.url_regex is not None]
        self.url_mask = 0
        for bit, _regex in url_rules:
            self.url_mask |= bit
        self.url_union = (
            re.compile("|".join(f"(?:{regex.pattern})" for _bit, regex in url_rules), url_rules[0][1].flags)
            if url_rules and all(r.flags == url_rules[0][1].flags for _b, r in url_rules)
            else None
        )
        # Cheaper still: a URL that contains none of the literals the patterns require matches
        # none of them. One search for all literals (case-insensitive, as the patterns are) is a
        # fast scan, where the union backtracks through every `*` of every pattern. Only a
        # filter: a URL that passes it is still matched against the union and the rule's regex.
        literals = [rule.url_literals for rule in self.rules if rule.url_regex is not None]
        self.url_prefilter = (
            re.compile("|".join(re.escape(text) for text in sorted({t for group in literals for t in group},
                                                                  key=len, reverse=True)), re.IGNORECASE)
            if literals and self.url_union is not None and all(group is not None for group in literals)
            else None
        )
        self._exact, self._wildcard = exact, wildcard
        self._categories, self._applications = categories, applications
        self._methods, self._ports = methods, ports
        self._clients = NetworkMap(client_entries)
        self._user_masks = users.by_value
        self._group_masks = groups.by_value
        self._users_free = users.unconditioned
        self._groups_free = groups.unconditioned
        self.anonymous = users.unconditioned & groups.unconditioned
        # Rules matching on how a request reached the node (tls: inspected, bypassed, plain). Empty
        # when no rule uses the condition: the decision then never looks at it.
        self.tls_conditioned = bool(tls_modes.by_value)
        self._tls_modes = tls_modes

    def host_mask(self, chain: list[str], host_categories: tuple[str, ...]) -> int:
        """Rules whose `domains` and `categories` conditions this host satisfies."""
        domains = self._exact.unconditioned | self._exact.by_value.get(chain[0], 0)
        wildcard = self._wildcard.by_value
        if wildcard:
            for suffix in chain:
                domains |= wildcard.get(suffix, 0)
        in_categories = self._categories.unconditioned
        for name in host_categories:
            in_categories |= self._categories.by_value.get(name, 0)
        return domains & in_categories

    def application_mask(self, application: str | None) -> int:
        if application is None:
            return self._applications.unconditioned
        return self._applications.unconditioned | self._applications.by_value.get(application, 0)

    def method_mask(self, method: str) -> int:
        by_value = self._methods.by_value
        found = by_value.get(method)
        if found is None:
            found = by_value.get(method.upper(), 0)
        return self._methods.unconditioned | found

    def port_mask(self, port: int) -> int:
        found = self._ports.unconditioned | self._ports.by_value.get(port, 0)
        for low, high, bit in self.port_ranges:
            if low <= port <= high:
                found |= bit
        return found

    def client_mask(self, address: Address | None) -> int:
        """Rules whose `clients` condition a parsed client address satisfies."""
        return self.unconditioned_clients | self._clients.lookup_address(address)

    def identity_mask(self, user: str | None, user_groups: frozenset[str]) -> int:
        # Rules naming users or groups never match an unauthenticated request.
        if user is None:
            return self.anonymous
        by_user = self._users_free | self._user_masks.get(user, 0)
        by_group = self._groups_free
        if user_groups:
            group_masks = self._group_masks
            for group in user_groups:
                by_group |= group_masks.get(group, 0)
        return by_user & by_group

    def tls_mask(self, mode: str | None) -> int:
        """Rules whose `tls` condition the request's TLS mode satisfies (None satisfies none)."""
        return self._tls_modes.unconditioned | self._tls_modes.by_value.get(mode, 0)


__all__ = ["CompiledRule", "RuleTable", "Schedule", "full_url", "shell_patterns_regex"]
