"""Write-only values of a policy document: stored and synced, never shown.

A directory's bind password must reach every slave (over the encrypted control plane, inside
the policy version), but no portal page, API answer, export, diff, audit entry or log shows
it. Wherever a document leaves the node for a person it goes through `redact`, which puts a
marker in place of each secret; a document sent back with the marker still in place keeps the
running version's value (`restore`), so an administrator can edit other fields without knowing
the password.
"""

from __future__ import annotations

import copy
from typing import Any

# Paths of secret strings in a canonical document.
SECRET_PATHS: tuple[tuple[str, ...], ...] = (
    ("authentication", "directory", "bind_password"),
)
MARKER_KEY = "$secret"


def marker(state: str = "set") -> dict[str, str]:
    """What a secret looks like to people: {"$secret": "set"} (or "changed" in a diff)."""
    return {MARKER_KEY: state}


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {MARKER_KEY}


def _get(document: Any, path: tuple[str, ...]) -> Any:
    node = document
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _parent(document: Any, path: tuple[str, ...]) -> dict | None:
    node = document
    for key in path[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            return None
        node = node[key]
    return node if isinstance(node, dict) else None


def redact(document: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy with every secret replaced by its marker; with `previous`, a secret that differs
    from the previous document's is marked "changed" (so a diff still shows that it changed)."""
    if not any(_get(document, path) is not None for path in SECRET_PATHS):
        return document
    shown = copy.deepcopy(document)
    for path in SECRET_PATHS:
        parent = _parent(shown, path)
        if parent is None or path[-1] not in parent:
            continue
        state = "set"
        if previous is not None and _get(previous, path) != parent[path[-1]]:
            state = "changed"
        parent[path[-1]] = marker(state)
    return shown


def restore(submitted: Any, running: dict[str, Any] | None) -> Any:
    """`submitted` with each marker replaced by the running document's value (when it has one;
    otherwise the marker stays and validation says the field must be a string)."""
    if not isinstance(submitted, dict):
        return submitted
    if not any(is_marker(_get(submitted, path)) for path in SECRET_PATHS):
        return submitted
    restored = copy.deepcopy(submitted)
    for path in SECRET_PATHS:
        parent = _parent(restored, path)
        if parent is None or not is_marker(parent.get(path[-1])):
            continue
        value = _get(running, path) if running is not None else None
        if isinstance(value, str):
            parent[path[-1]] = value
    return restored


__all__ = ["MARKER_KEY", "SECRET_PATHS", "is_marker", "marker", "redact", "restore"]
