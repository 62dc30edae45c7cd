"""Reusing the parts of a policy version that did not change since the one before.

Pushing a big policy again (100,000 domains, 1000 rules) with one comment or one rule changed
would otherwise validate, serialise and compile every section again on every node and in every
worker: about half a second of CPU per process per version, on the cores that serve requests.
Here each expensive section is checked against the previous version's and, when it is the same,
the previous validated section, its canonical bytes and its compiled pieces are taken as they
are. A section is the same when `same_json` says so: Python's `==` (a C-speed walk) plus a check
that every value has the same JSON type, since `==` holds `True`, `1` and `1.0` equal where a
policy does not (`"enabled": 1` is refused, `"enabled": true` is not).

What is reused is exactly what a full preparation gives: validating or compiling a section is a
pure function of that section and of the names it may refer to, and both are compared.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


def same_json(a: Any, b: Any) -> bool:
    """True when two JSON values are equal with the same types throughout (and dict keys in the
    same order, so even error messages and iteration orders are those of the first)."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        if len(a) != len(b) or list(a) != list(b):
            return False
        for key, value in a.items():
            if not same_json(value, b[key]):
                return False
        return True
    if kind is list:
        if len(a) != len(b) or a != b:  # rejects most differences at C speed
            return False
        types = list(map(type, a))
        if types != list(map(type, b)):  # True == 1 == 1.0 for `==`: not for a policy
            return False
        if dict in types or list in types:
            for x, y, t in zip(a, b, types):
                if (t is dict or t is list) and not same_json(x, y):
                    return False
        return True
    return a == b


def json_copy(value: Any) -> Any:
    """A copy of a JSON value, down to its strings and numbers (which are immutable)."""
    kind = type(value)
    if kind is dict:
        return {key: json_copy(item) for key, item in value.items()}
    if kind is list:
        types = set(map(type, value))
        if dict in types or list in types:
            return [json_copy(item) for item in value]
        return list(value)
    return value


class SectionMemo:
    """The last validated form of each section, keyed by the section's input and the names it
    may refer to. `validate(name, raw, check, context)` returns `check(raw)`, or the form kept
    from the last call when `raw` and `context` are the same as then.

    One per policy store; thread-safe (the policy thread and a synchronous apply may both use it).
    Only successful validations are kept: a refused section is checked again next time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[Any, Hashable, Any]] = {}
        self.reused = 0  # sections taken from the memo (tests, metrics)
        self.checked = 0  # sections validated in full

    def validate(self, name: str, raw: Any, check: Callable[[Any], T], context: Hashable = None) -> T:
        with self._lock:
            kept = self._kept.get(name)
        # The validated form itself counts as the same input: a canonical section is what
        # validating it again gives (a slave rebuilding a version from its changed sections).
        if kept is not None and kept[1] == context and (raw is kept[2] or same_json(kept[0], raw)):
            self.reused += 1
            return kept[2]
        result = check(raw)
        self.checked += 1
        # A copy: the caller may change its document after this (and a later call must not see
        # the changed one as the same). Lists of strings copy at C speed.
        with self._lock:
            self._kept[name] = (json_copy(raw), context, result)
        return result

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


def reuse_or_build(previous: dict[str, tuple[Any, Any]] | None, sources: dict[str, tuple[Any, Any]],
                   name: str, source: Any, build: Callable[[Any], T]) -> T:
    """A compiled piece: the previous version's when its source section is the same, else
    `build(source)`. Records (source, piece) in `sources` for the version after."""
    if previous is not None:
        found = previous.get(name)
        if found is not None and same_json(found[0], source):
            sources[name] = (source, found[1])
            return found[1]
    piece = build(source)
    sources[name] = (source, piece)
    return piece


def changed_sections(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The top-level sections of `new` that differ from `old` (set), and those `new` lacks."""
    changed = {key: value for key, value in new.items() if key not in old or not same_json(old[key], value)}
    removed = [key for key in old if key not in new]
    return changed, removed


def apply_sections(old: dict[str, Any], changed: dict[str, Any], removed: list[str]) -> dict[str, Any]:
    """`old` with `changed` sections set and `removed` ones gone; unchanged sections are the very
    objects of `old` (so compiling reuses their pieces by identity). Key order: that of a full
    document (the canonical order of `changed`'s sender is kept for new keys)."""
    document = {key: changed.get(key, value) for key, value in old.items() if key not in removed}
    for key, value in changed.items():
        if key not in document:
            document[key] = value
    return document


__all__ = ["SectionMemo", "apply_sections", "changed_sections", "reuse_or_build", "json_copy", "same_json"]
