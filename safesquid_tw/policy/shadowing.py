"""Rules that can never decide: warnings (not errors) about access rules an earlier rule shadows.

Rules are first-match. A later rule is *shadowed* when every request it matches is matched by an
earlier enabled rule already: the earlier rule has no condition the later one does not imply
(its networks contain the later's, its domains cover the later's, and so on). Conditions that
cannot be compared exactly (URL patterns, schedules) make a rule shadow nothing unless they are
the same. A rule is *partly shadowed* by an earlier rule that would cover it but for the client
networks: for clients in those networks the earlier rule decides (the usual surprise after
`allow-local-networks`). Works on a validated document, a plain function with no I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from safesquid_tw.policy.hosts import parse_domain_pattern

SET_KEYS = ("users", "groups", "methods", "categories", "applications", "tls")
EXACT_KEYS = ("url_patterns", "schedule")


@attrs.frozen
class ShadowWarning:
    index: int  # the shadowed rule's position (0-based)
    rule: str
    by_index: int
    by_rule: str
    complete: bool
    message: str

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _networks(values: list[str]) -> list[Any]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _networks_cover(outer: list[str], inner: list[str]) -> bool:
    wide = _networks(outer)
    return all(any(n.version == w.version and n.subnet_of(w) for w in wide) for n in _networks(inner))


def _networks_overlap(a: list[str], b: list[str]) -> bool:
    try:
        return any(x.version == y.version and x.overlaps(y) for x in _networks(a) for y in _networks(b))
    except ValueError:
        return False


def _domain_covers(outer: str, inner: str) -> bool:
    o_wild, o_name = parse_domain_pattern(outer)
    i_wild, i_name = parse_domain_pattern(inner)
    if o_wild:
        return i_name == o_name or i_name.endswith("." + o_name)
    return not i_wild and i_name == o_name


def _ports(values: list[Any]) -> list[tuple[int, int]]:
    spans = []
    for v in values:
        if isinstance(v, int):
            spans.append((v, v))
        else:
            low, _, high = str(v).partition("-")
            spans.append((int(low), int(high or low)))
    return spans


def _covers(key: str, outer: list[Any], inner: list[Any]) -> bool:
    if key == "clients":
        return _networks_cover(outer, inner)
    if key == "domains":
        return all(any(_domain_covers(o, i) for o in outer) for i in inner)
    if key == "ports":
        wide = _ports(outer)
        return all(any(lo <= a and b <= hi for lo, hi in wide) for a, b in _ports(inner))
    if key == "methods":
        return {m.upper() for m in inner} <= {m.upper() for m in outer}
    return set(inner) <= set(outer)


def _condition_covers(key: str, earlier: dict[str, Any], later: dict[str, Any]) -> bool:
    if key not in earlier:
        return True  # no condition: every value
    if key not in later:
        return False  # the later rule also matches values the earlier one does not
    if key in EXACT_KEYS:
        return earlier[key] == later[key]
    try:
        return _covers(key, list(earlier[key]), list(later[key]))
    except (ValueError, TypeError):
        return False


def shadowed_rules(document: dict[str, Any]) -> list[ShadowWarning]:
    """Every rule shadowed completely or partly by an earlier enabled rule (the first such)."""
    rules = list(document.get("access", {}).get("rules", []))
    warnings: list[ShadowWarning] = []
    other_keys = ("domains", "ports", *SET_KEYS, *EXACT_KEYS)
    for j, later in enumerate(rules):
        if not later.get("enabled", True):
            continue
        partial: ShadowWarning | None = None
        for i in range(j):
            earlier = rules[i]
            if not earlier.get("enabled", True):
                continue
            if not all(_condition_covers(k, earlier, later) for k in other_keys):
                continue
            name, by = later["name"], earlier["name"]
            if _condition_covers("clients", earlier, later):
                warnings.append(ShadowWarning(
                    j, name, i, by, True,
                    f"rule {name!r} never decides: the earlier rule {by!r} ({earlier['action']}) matches every "
                    f"request it would match; move {name!r} above {by!r} or narrow {by!r}"))
                partial = None
                break
            if partial is None and "clients" in earlier and earlier["action"] != later["action"] and (
                    "clients" not in later or _networks_overlap(earlier["clients"], later["clients"])):
                partial = ShadowWarning(
                    j, name, i, by, False,
                    f"rule {name!r} does not apply to clients in {', '.join(earlier['clients'])}: the earlier "
                    f"rule {by!r} ({earlier['action']}) decides for them first; move {name!r} above {by!r} "
                    "to apply it to them too")
        if partial is not None:
            warnings.append(partial)
    return warnings


def shadow_messages(document: dict[str, Any]) -> list[str]:
    return [w.message for w in shadowed_rules(document)]


__all__ = ["ShadowWarning", "shadow_messages", "shadowed_rules"]
