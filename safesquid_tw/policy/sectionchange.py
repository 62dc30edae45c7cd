"""A version sent to slaves as the top-level sections that changed since the version before.

A push that changes a comment of a 3.2 MB policy (100,000 domains) would otherwise send every
slave the whole document, which each joins, hashes, decodes and compares again. The master makes,
once per version in its policy thread, the changed sections with the previous version's digest as
the base (`section_change`); a slave that runs that base rebuilds the document from its own
sections and the changed ones (`rebuild_from_change`), validates it (its unchanged sections are
taken as they are), and checks that the result has the version's announced digest. Anything else
(another base, a change too big for one call, a digest that differs) and the slave fetches the
whole version as before: the change is only a shortcut to the same bytes.

Change bytes: `{"base": digest, "changed": {section: value, ...}, "removed": [section, ...]}`.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from safesquid_tw.policy.canonical_io import canonical_bytes_in_pieces
from safesquid_tw.policy.codec import parse_json
from safesquid_tw.policy.compiled import Policy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.incremental import apply_sections, same_json

MAX_CHANGE_BYTES = 256 * 1024  # one control-plane call (cluster/wire.py MAX_CHUNK_BYTES)


class ChangeNotApplicable(Exception):
    """The change does not apply to the version this node runs: fetch the whole version."""


@attrs.frozen
class SectionChange:
    base: str  # the digest of the version it applies to
    version: int
    digest: str  # the digest of the version it makes
    data: bytes = attrs.field(repr=False)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def section_change(base: Policy, policy: Policy, kept: dict[str, tuple[Any, bytes]],
                   limit: int = MAX_CHANGE_BYTES) -> SectionChange | None:
    """`policy` as its sections that differ from `base`, or None when that is over `limit`
    bytes. `kept`: canonical bytes per section (canonical_io.canonical_parts_reusing), used
    for a section that is the very object they were made of."""
    old, new = base.document, policy.document
    changed = sorted(key for key, value in new.items()
                     if key not in old or (old[key] is not value and not same_json(old[key], value)))
    removed = [key for key in old if key not in new]
    parts: list[bytes] = []
    size = 0
    for key in changed:
        found = kept.get(key)
        data = found[1] if found is not None and found[0] is new[key] else canonical_bytes_in_pieces(new[key])
        size += len(data) + len(key) + 4
        if size > limit:
            return None
        parts.append(_dumps(key) + b":" + data)
    data = (b'{"base":' + _dumps(base.digest) + b',"changed":{' + b",".join(parts) + b'},"removed":'
            + _dumps(removed) + b"}")
    if len(data) > limit:
        return None
    return SectionChange(base=base.digest, version=policy.version, digest=policy.digest, data=data)


def rebuild_from_change(data: bytes, current: Policy | None) -> dict[str, Any]:
    """The document a change makes of `current`'s; raises ChangeNotApplicable."""
    try:
        change = parse_json(data)
    except PolicyError as e:
        raise ChangeNotApplicable(f"the change is not JSON ({e})") from None
    if not isinstance(change, dict) or not isinstance(change.get("changed"), dict) or \
            not isinstance(change.get("removed"), list) or not all(isinstance(k, str) for k in change["removed"]):
        raise ChangeNotApplicable("the change is not a set of policy sections")
    if current is None or change.get("base") != current.digest:
        raise ChangeNotApplicable(f"the change applies to {str(change.get('base'))[:80]}, not to the version in force")
    return apply_sections(current.document, change["changed"], change["removed"])


__all__ = ["ChangeNotApplicable", "MAX_CHANGE_BYTES", "SectionChange", "rebuild_from_change", "section_change"]
