"""One JSON form of a policy, for disk and wire, and the way from bytes to a compiled Policy.

The canonical form (sorted keys, compact separators, UTF-8) of the validated document is what
gets stored, sent and hashed, so two nodes holding the same digest hold the same policy.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from safesquid_tw.policy.compiled import Policy, compile_policy
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.validate import FORMAT, validate_document

DIGEST_PREFIX = "sha256:"


def canonical_bytes(doc: dict[str, Any]) -> bytes:
    """The one byte form of a document: sorted keys, no blanks, UTF-8, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def digest(doc: dict[str, Any]) -> str:
    return DIGEST_PREFIX + hashlib.sha256(canonical_bytes(doc)).hexdigest()


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; in a policy that silently drops a setting.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PolicyError("(document)", f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise PolicyError("(document)", f"{name} is not a JSON value")


def parse_json(data: bytes) -> object:
    """Bytes to a JSON value, with errors as PolicyError naming the line and column."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PolicyError("(document)", f"is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise PolicyError("(document)", f"line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise PolicyError("(document)", "is nested too deeply") from None


def policy_from_document(doc: object, version: int) -> Policy:
    """Validate and compile a parsed document into version `version`."""
    canonical = validate_document(doc)
    return Policy(version=version, digest=digest(canonical), document=canonical, compiled=compile_policy(canonical))


def load_policy_bytes(data: bytes, version: int) -> Policy:
    return policy_from_document(parse_json(data), version)


def load_policy_file(path: str, version: int = 1) -> Policy:
    """Read, validate and compile a policy file; OSError if it cannot be read."""
    with open(path, "rb") as f:
        data = f.read()
    return load_policy_bytes(data, version)


__all__ = [
    "FORMAT",
    "PolicyError",
    "canonical_bytes",
    "digest",
    "load_policy_bytes",
    "load_policy_file",
    "parse_json",
    "policy_from_document",
    "validate_document",
]
