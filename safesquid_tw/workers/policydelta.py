"""Policy versions sent to workers as what changed since the version a worker runs.

A big policy (100,000 domains) is 3.2 MB of JSON: sent whole, every worker decodes it (one call
holding the worker's GIL for several milliseconds, on the process that serves requests) and
compiles it all again. Most pushes change a comment or a rule, so the node sends a worker the
top-level sections that differ from the version the node sent it last, with that version's
digest as the base. The worker takes every other section from the version it runs (the very
objects, so compiling reuses their pieces: policy/incremental.py). A worker whose version is
not the base (it restarted, or refused a version) answers `{"t": "policy", ..., "resend": true}`
and gets the whole document.

Messages (parent -> worker):
  {"t": "policy", "version": int, "digest": str, "doc": {...}}                      the whole version
  {"t": "policy", "version": int, "digest": str, "base": str, "changed": {...}, "removed": [...]}
"""

from __future__ import annotations

from typing import Any

from safesquid_tw.policy.compiled import Policy, compile_policy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.incremental import apply_sections, changed_sections


class NeedWholeVersion(Exception):
    """A change was sent against a version this worker does not run."""

    def __init__(self, base: object, running: str | None) -> None:
        super().__init__(f"a change against version {base} arrived while running {running}; "
                         "the whole version is needed")


def whole_message(policy: Policy) -> dict[str, Any]:
    return {"t": "policy", "version": policy.version, "digest": policy.digest, "doc": policy.document}


def change_message(base: Policy, policy: Policy) -> dict[str, Any]:
    """`policy` as the sections that differ from `base` (a C-speed comparison per section)."""
    changed, removed = changed_sections(base.document, policy.document)
    return {"t": "policy", "version": policy.version, "digest": policy.digest, "base": base.digest,
            "changed": changed, "removed": removed}


def merge_waiting(waiting: dict[str, Any] | None, message: dict[str, Any]) -> dict[str, Any]:
    """The one message to apply when `message` arrives while `waiting` has not been started:
    a change against the waiting version is folded into it (so the newest still applies to
    what the worker runs); anything else simply replaces it."""
    if waiting is None or "doc" in message or message.get("base") != waiting.get("digest"):
        return message
    changed = message.get("changed") or {}
    removed = list(message.get("removed") or [])
    merged = {"t": "policy", "version": message["version"], "digest": message["digest"]}
    if "doc" in waiting:
        merged["doc"] = apply_sections(waiting["doc"], changed, removed)
        return merged
    both = {key: value for key, value in (waiting.get("changed") or {}).items() if key not in removed}
    both.update(changed)
    gone = [key for key in (waiting.get("removed") or []) if key not in changed]
    gone += [key for key in removed if key not in gone]
    merged.update(base=waiting["base"], changed=both, removed=gone)
    return merged


def compile_message(message: dict[str, Any], current: Policy | None) -> Policy:
    """The version a message carries, compiled (in a thread), reusing what `current` compiled
    for every section that did not change. The parent validated the version; a worker only
    compiles. Raises NeedWholeVersion, or PolicyError for a message that is not a version."""
    if "doc" in message:
        document = message["doc"]
        if not isinstance(document, dict):
            raise PolicyError("(worker)", "the version sent is not a policy document")
    else:
        changed, removed = message.get("changed"), message.get("removed")
        if not isinstance(changed, dict) or not isinstance(removed, list):
            raise PolicyError("(worker)", "the change sent is not a set of policy sections")
        if current is None or current.digest != message.get("base"):
            raise NeedWholeVersion(message.get("base"), current.digest if current is not None else None)
        document = apply_sections(current.document, changed, removed)
    previous = current.compiled if current is not None else None
    return Policy(version=int(message["version"]), digest=str(message["digest"]), document=document,
                  compiled=compile_policy(document, previous))


__all__ = ["NeedWholeVersion", "change_message", "compile_message", "merge_waiting", "whole_message"]
