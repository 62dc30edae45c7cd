"""Data loss prevention: detectors run over query strings and the start of request bodies.

Every pattern is compiled once per policy version. Text is scanned as UTF-8 (invalid bytes
replaced) and, when it carries URL or form encoding (`%41`, `+`), also in decoded form, so that
`project+bluebird` in a form post is found like `project bluebird`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

from safesquid_tw.policy.model import DlpHit

# Runs of at least 13 characters of digit groups separated by spaces or dashes; cards are picked
# out of them below. (A flat character class keeps the scan fast on long runs.)
_DIGIT_RUN = re.compile(r"\d[\d -]{11,}\d")
_SEPARATORS = re.compile(r"[ -]+")
_CARD_MIN, _CARD_MAX = 13, 19
_DOUBLED = {str(d): (2 * d if d < 5 else 2 * d - 9) for d in range(10)}
# Stretches tried inside longer runs, per scan: bounds the work a body of nothing but digit
# groups can cost (the whole of each run is always checked, which is linear in the text).
_WINDOW_BUDGET = 10000


def luhn_valid(digits: str) -> bool:
    """The Luhn check digit test, for a string of ASCII digits."""
    total = sum(map(int, digits[-1::-2])) + sum(map(_DOUBLED.__getitem__, digits[-2::-2]))
    return total % 10 == 0


def contains_card_number(text: str) -> bool:
    """A 13 to 19 digit number (spaces or dashes between digits allowed) passing the Luhn check.

    Each run of digit groups is checked whole. When that is not a card, stretches of whole
    groups inside it are tried too (groups of three digits or more, as cards are written), so
    `order 12 4111 1111 1111 1111` is found; at most `_WINDOW_BUDGET` stretches per scan.
    """
    budget = _WINDOW_BUDGET
    for match in _DIGIT_RUN.finditer(text):
        run = match.group()
        if run.isdigit():
            if len(run) <= _CARD_MAX and luhn_valid(run):
                return True
            continue
        groups = _SEPARATORS.split(run)
        digits = "".join(groups)
        if _CARD_MIN <= len(digits) <= _CARD_MAX and luhn_valid(digits):
            return True
        if budget > 0:
            budget = _search_stretches(groups, budget)
            if budget < 0:
                return True
    return False


def _search_stretches(groups: list[str], budget: int) -> int:
    """Try stretches of whole groups of card length; the budget left, or -1 when a card is found."""
    count = len(groups)
    for start in range(count):
        if len(groups[start]) < 3:
            continue
        length = 0
        for end in range(start, count):
            size = len(groups[end])
            length += size
            if size < 3 or length > _CARD_MAX or (start == 0 and end == count - 1):
                break  # the whole run was checked already
            if length >= _CARD_MIN:
                budget -= 1
                if luhn_valid("".join(groups[start : end + 1])):
                    return -1
        if budget <= 0:
            break
    return budget


class _Detector:
    __slots__ = ("hit", "regexes", "is_card")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.hit = DlpHit(detector=spec["name"], action=spec["action"])
        self.is_card = spec["type"] == "card_number"
        if spec["type"] == "keyword":
            alternatives = "|".join(re.escape(keyword) for keyword in spec["patterns"])
            self.regexes: tuple[re.Pattern[str], ...] = (re.compile(alternatives, re.IGNORECASE),)
        elif spec["type"] == "regex":
            # Kept apart: joining user regexes would renumber their groups and move inline flags.
            self.regexes = tuple(re.compile(pattern) for pattern in spec["patterns"])
        else:
            self.regexes = ()

    def finds(self, text: str) -> bool:
        if self.is_card:
            return contains_card_number(text)
        return any(regex.search(text) for regex in self.regexes)


class DlpRules:
    """The `dlp` section of one policy version."""

    __slots__ = ("scan_limit", "scans_bodies", "_detectors")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.scan_limit: int = spec["scan_limit_bytes"]
        self._detectors = tuple(_Detector(detector) for detector in spec["detectors"])
        self.scans_bodies = bool(self._detectors)

    def scan(self, text: bytes) -> list[DlpHit]:
        """The detectors that find something in the first `scan_limit` bytes, in document order."""
        if not self._detectors or not text:
            return []
        decoded = text[: self.scan_limit].decode("utf-8", "replace")
        variants = [decoded]
        if "%" in decoded or "+" in decoded:
            unescaped = unquote_plus(decoded, errors="replace")
            if unescaped != decoded:
                variants.append(unescaped)
        return [d.hit for d in self._detectors if any(d.finds(variant) for variant in variants)]


__all__ = ["DlpRules", "contains_card_number", "luhn_valid"]
