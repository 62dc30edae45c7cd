"""Readable differences between two policy documents: a unified diff of pretty-printed JSON,
split into classified lines for the page (added, removed, unchanged, hunk headers)."""

from __future__ import annotations

import difflib
import json
from typing import Any

import attrs

from safesquid_tw.policy.secrets import redact


@attrs.frozen
class DiffLine:
    kind: str  # "file", "hunk", "add", "del", "same"
    text: str


def pretty(document: dict[str, Any], previous: dict[str, Any] | None = None) -> list[str]:
    """The document as people see it: secrets replaced by markers."""
    return json.dumps(redact(document, previous), indent=2, sort_keys=True, ensure_ascii=False).splitlines()


def document_diff(old: dict[str, Any] | None, new: dict[str, Any], old_label: str, new_label: str,
                  context: int = 3) -> str:
    """The unified diff of two documents (the same form as the history's diff)."""
    before = pretty(old) if old is not None else []
    after = pretty(new, old)
    return "\n".join(difflib.unified_diff(before, after, old_label, new_label, n=context, lineterm=""))


def classify(diff_text: str) -> list[DiffLine]:
    lines = []
    for line in diff_text.splitlines():
        if line.startswith(("---", "+++")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "same"
        lines.append(DiffLine(kind, line))
    return lines


def counts(lines: list[DiffLine]) -> tuple[int, int]:
    """(lines added, lines removed)."""
    return sum(1 for line in lines if line.kind == "add"), sum(1 for line in lines if line.kind == "del")


__all__ = ["DiffLine", "classify", "counts", "document_diff", "pretty"]
