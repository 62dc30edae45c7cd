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

import heapq
import ipaddress
import threading
import weakref
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


class _Unusable:
    """A condition whose values could not be normalised: compared the slow way, as written."""


_UNUSABLE = _Unusable()


def _normalised(key: str, values: Any) -> Any:
    """A rule's condition in the form the pair comparisons need, made once per rule instead of
    once per pair (a 1000-rule policy has half a million pairs)."""
    try:
        if key in EXACT_KEYS:
            return values
        values = list(values)
        if key == "clients":
            return tuple(_networks(values))
        if key == "domains":
            return tuple(parse_domain_pattern(v) for v in values)
        if key == "ports":
            return tuple(_ports(values))
        if key == "methods":
            return frozenset(m.upper() for m in values)
        return frozenset(values)
    except (ValueError, TypeError, AttributeError):
        return _UNUSABLE


def _fast_covers(key: str, outer: Any, inner: Any) -> bool:
    """`_covers` on normalised values."""
    if key in EXACT_KEYS:
        return outer == inner
    if key == "clients":
        return all(any(n.version == w.version and n.subnet_of(w) for w in outer) for n in inner)
    if key == "domains":
        return all(any((i_name == o_name or i_name.endswith("." + o_name)) if o_wild
                       else (not i_wild and i_name == o_name) for o_wild, o_name in outer)
                   for i_wild, i_name in inner)
    if key == "ports":
        return all(any(lo <= a and b <= hi for lo, hi in outer) for a, b in inner)
    return inner <= outer


class _Rule:
    """One enabled rule with its conditions normalised."""

    __slots__ = ("index", "raw", "keys", "conditions")

    def __init__(self, index: int, raw: dict[str, Any], other_keys: tuple[str, ...]) -> None:
        self.index = index
        self.raw = raw
        # The compared conditions this rule has (clients apart): an earlier rule can only cover
        # a later one whose keys include all of its own.
        self.keys = frozenset(k for k in other_keys if k in raw)
        self.conditions = {k: _normalised(k, raw[k]) for k in (*self.keys, "clients") if k in raw}

    def covers(self, key: str, later: "_Rule") -> bool:
        """`_condition_covers(key, self.raw, later.raw)`, on the normalised values when both are."""
        if key not in self.raw:
            return True
        if key not in later.raw:
            return False
        outer, inner = self.conditions[key], later.conditions[key]
        if outer is _UNUSABLE or inner is _UNUSABLE:
            return _condition_covers(key, self.raw, later.raw)
        return _fast_covers(key, outer, inner)

    def clients_overlap(self, later: "_Rule") -> bool:
        outer, inner = self.conditions["clients"], later.conditions["clients"]
        if outer is _UNUSABLE or inner is _UNUSABLE:
            return _networks_overlap(self.raw["clients"], later.raw["clients"])
        return any(x.version == y.version and x.overlaps(y) for x in outer for y in inner)


def shadowed_rules(document: dict[str, Any]) -> list[ShadowWarning]:
    """Every rule shadowed completely or partly by an earlier enabled rule (the first such).

    Each rule's conditions are normalised once, and a later rule is compared only with the
    earlier rules whose compared conditions are a subset of its own (any other earlier rule has
    a condition the later one lacks, so it cannot cover it): a 1000-rule policy takes tens of
    milliseconds, not most of a second.
    """
    rules = list(document.get("access", {}).get("rules", []))
    warnings: list[ShadowWarning] = []
    other_keys = ("domains", "ports", *SET_KEYS, *EXACT_KEYS)
    # Earlier enabled rules so far, grouped by their set of compared conditions, in rule order.
    by_keys: dict[frozenset[str], list[_Rule]] = {}
    for j, raw in enumerate(rules):
        if not raw.get("enabled", True):
            continue
        later = _Rule(j, raw, other_keys)
        groups = [group for keys, group in by_keys.items() if keys <= later.keys]
        candidates = groups[0] if len(groups) == 1 else heapq.merge(*groups, key=lambda r: r.index)
        partial: ShadowWarning | None = None
        for earlier_rule in candidates:
            if not all(earlier_rule.covers(k, later) for k in earlier_rule.keys):
                continue
            earlier = earlier_rule.raw
            i = earlier_rule.index
            name, by = raw["name"], earlier["name"]
            if earlier_rule.covers("clients", later):
                warnings.append(ShadowWarning(
                    j, name, i, by, True,
                    f"rule {name!r} never decides: the earlier rule {by!r} ({earlier['action']}) matches every "
                    f"request it would match; move {name!r} above {by!r} or narrow {by!r}"))
                partial = None
                break
            if partial is None and "clients" in earlier and earlier["action"] != raw["action"] and (
                    "clients" not in raw or earlier_rule.clients_overlap(later)):
                partial = ShadowWarning(
                    j, name, i, by, False,
                    f"rule {name!r} does not apply to clients in {', '.join(earlier['clients'])}: the earlier "
                    f"rule {by!r} ({earlier['action']}) decides for them first; move {name!r} above {by!r} "
                    "to apply it to them too")
        if partial is not None:
            warnings.append(partial)
        by_keys.setdefault(later.keys, []).append(later)
    return warnings


# The warnings of each policy version, computed once: in the worker thread that prepares the
# version (policy/store.py), so that neither the swap's observers nor the API's answer compute
# them again on the reactor thread. Keyed by the version's object; forgotten with it.
_by_policy: "weakref.WeakKeyDictionary[Any, list[ShadowWarning]]" = weakref.WeakKeyDictionary()
_by_policy_lock = threading.Lock()
_last_rules: list[tuple[Any, list[ShadowWarning]] | None] = [None]  # (rules list, its warnings)


def policy_warnings(policy: Any) -> list[ShadowWarning]:
    """`shadowed_rules(policy.document)` for one `Policy` version, computed on first use (any
    thread) and remembered for as long as the version lives."""
    with _by_policy_lock:
        found = _by_policy.get(policy)
    if found is None:
        # They depend on the rules alone: a version whose rules are the very list of the last
        # one computed (a section reused unchanged, policy/incremental.py) has the same warnings.
        rules = policy.document.get("access", {}).get("rules")
        last = _last_rules[0]
        if last is not None and rules is not None and last[0] is rules:
            found = last[1]
        else:
            found = shadowed_rules(policy.document)
            _last_rules[0] = (rules, found) if rules is not None else None
        with _by_policy_lock:
            found = _by_policy.setdefault(policy, found)
    return found


def shadow_messages(document: dict[str, Any]) -> list[str]:
    return [w.message for w in shadowed_rules(document)]


__all__ = ["ShadowWarning", "policy_warnings", "shadow_messages", "shadowed_rules"]
