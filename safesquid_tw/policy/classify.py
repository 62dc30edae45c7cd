"""What a request is: the category of its host and the application it belongs to.

Categories: a host belongs to the categories listing the most specific of its names (the host
itself, then each parent domain). A domain listed in several categories puts its hosts in all of
them, reported in name order. Applications: the first signature in document order whose hosts,
paths and headers all match names the request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from safesquid_tw.policy.escapes import normal_escapes
from safesquid_tw.policy.hosts import parse_domain_pattern
from safesquid_tw.policy.rules import shell_patterns_regex


class CategoryIndex:
    """Domain -> categories; `*.example.com` and `example.com` mean the same in a category."""

    __slots__ = ("_by_domain", "size")

    def __init__(self, categories: Mapping[str, Any]) -> None:
        by_domain: dict[str, list[str]] = {}
        for name in sorted(categories):
            for pattern in categories[name]["domains"]:
                _wildcard, domain = parse_domain_pattern(pattern)
                names = by_domain.setdefault(domain, [])
                if name not in names:
                    names.append(name)
        self._by_domain: dict[str, tuple[str, ...]] = {d: tuple(n) for d, n in by_domain.items()}
        self.size = len(self._by_domain)

    def lookup(self, chain: list[str]) -> tuple[str, ...]:
        """The categories of the most specific listed name in `chain` (host first), or ()."""
        by_domain = self._by_domain
        for name in chain:
            found = by_domain.get(name)
            if found is not None:
                return found
        return ()


class _Signature:
    __slots__ = ("name", "path_regex", "header_regexes")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name: str = spec["name"]
        paths = spec.get("paths")
        # Request paths are matched with escapes in one spelling (proxy/urlnorm.py): so are patterns.
        self.path_regex = shell_patterns_regex([normal_escapes(p) for p in paths]) if paths else None
        self.header_regexes: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
            (header, shell_patterns_regex([pattern])) for header, pattern in spec.get("headers", {}).items()
        )

    def matches(self, path: str, headers: Mapping[str, str]) -> bool:
        if self.path_regex is not None and not self.path_regex.match(path):
            return False
        for header, regex in self.header_regexes:
            value = headers.get(header)
            if value is None or not regex.match(value):
                return False
        return True


class ApplicationIndex:
    """Signatures indexed by host, so most requests look at no signature at all."""

    __slots__ = ("_signatures", "_exact", "_wildcard")

    def __init__(self, applications: list[dict[str, Any]]) -> None:
        self._signatures = tuple(_Signature(spec) for spec in applications)
        exact: dict[str, list[int]] = {}
        wildcard: dict[str, list[int]] = {}
        for i, spec in enumerate(applications):
            for pattern in spec["hosts"]:
                is_wildcard, domain = parse_domain_pattern(pattern)
                (wildcard if is_wildcard else exact).setdefault(domain, []).append(i)
        self._exact = exact
        self._wildcard = wildcard

    def candidates(self, chain: list[str]) -> tuple[int, ...]:
        """Signatures whose hosts match, in document order; depends on the host alone."""
        found: list[int] = []
        hit = self._exact.get(chain[0])
        if hit:
            found.extend(hit)
        wildcard = self._wildcard
        for suffix in chain:
            hit = wildcard.get(suffix)
            if hit:
                found.extend(hit)
        if not found:
            return ()
        return tuple(sorted(set(found)))

    def first_match(self, candidates: tuple[int, ...], path: str, headers: Mapping[str, str]) -> str | None:
        for i in candidates:
            signature = self._signatures[i]
            if signature.matches(path, headers):
                return signature.name
        return None


__all__ = ["ApplicationIndex", "CategoryIndex"]
