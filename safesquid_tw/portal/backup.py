"""Backup and restore of a master's configuration: every policy version and the accounts.

A backup is one JSON document: every version in the history (its document, who applied it,
when, why), the administrator accounts with their argon2id hashes, the API tokens' digests and
the master's control-plane TLS key and certificate (backupsecrets.py); with the report store it
is a .tar.gz of that document and a snapshot of the store. Restoring is for a fresh node, one whose policy so far only came
from files: every version of the backup is checked first (format, validation, digest), and only
then replayed in order, each as a new version whose comment names the original one.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from safesquid_tw.policy.codec import digest
from safesquid_tw.policy.errors import PolicyError
from safesquid_tw.policy.validate import validate_document

FORMAT = "safesquid-backup/2"
# Version 1 held the history and the accounts without hashes; it is still restored.
FORMATS = ("safesquid-backup/1", FORMAT)
MAX_VERSIONS = 10000


class BackupError(ValueError):
    """A backup that cannot be restored; the message says why."""


@attrs.frozen
class BackupVersion:
    version: int
    applied_by: str
    applied_at: float
    comment: str
    document: dict[str, Any]


def build_backup(history: Any, accounts: list[dict[str, Any]], *, node: str, role: str, now: float,
                 current_version: int | None) -> dict[str, Any]:
    """The backup document (blocking: it reads every version's file)."""
    versions = []
    for info in sorted(history.versions(), key=lambda i: i.version):
        entry = info.as_json()
        entry["policy"] = history.document(info.version)
        versions.append(entry)
    return {
        "format": FORMAT,
        "created_at": now,
        "node": node,
        "role": role,
        "current_version": current_version,
        "versions": versions,
        "accounts": accounts,
    }


def check_backup(data: Any) -> tuple[list[BackupVersion], list[dict[str, Any]]]:
    """Every version of a backup, validated, oldest first, and its accounts; BackupError if any
    part is wrong (then nothing may be restored)."""
    if not isinstance(data, dict) or data.get("format") not in FORMATS:
        raise BackupError(f"not a backup file (its format is not {FORMAT!r})")
    raw_versions = data.get("versions")
    if not isinstance(raw_versions, list) or not raw_versions:
        raise BackupError("the backup holds no policy version")
    if len(raw_versions) > MAX_VERSIONS:
        raise BackupError(f"the backup holds more than {MAX_VERSIONS} versions")
    versions = []
    seen: set[int] = set()
    for position, entry in enumerate(raw_versions):
        where = f"versions[{position}]"
        if not isinstance(entry, dict):
            raise BackupError(f"{where} is not an object")
        number = entry.get("version")
        if type(number) is not int or number < 1 or number in seen:
            raise BackupError(f"{where}: 'version' must be a positive whole number, each once")
        seen.add(number)
        try:
            canonical = validate_document(entry.get("policy"))
        except PolicyError as e:
            raise BackupError(f"version {number} does not validate: {e}") from None
        recorded = entry.get("digest")
        if recorded is not None and recorded != digest(canonical):
            raise BackupError(f"version {number}: its document does not match its recorded digest {recorded}")
        applied_at = entry.get("applied_at")
        versions.append(BackupVersion(
            version=number,
            applied_by=str(entry.get("applied_by") or "unknown"),
            applied_at=float(applied_at) if isinstance(applied_at, (int, float)) else 0.0,
            comment=str(entry.get("comment") or ""),
            document=canonical,
        ))
    accounts = data.get("accounts", [])
    if not isinstance(accounts, list) or not all(isinstance(a, dict) and isinstance(a.get("name"), str)
                                                 for a in accounts):
        raise BackupError("'accounts' must be a list of objects with a name")
    return sorted(versions, key=lambda v: v.version), accounts


def parse_backup(data: bytes) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise BackupError("the file is nested too deeply to be a backup") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BackupError(f"the file is not JSON ({e})") from None


def is_fresh(history: Any) -> bool:
    """No administrator has changed this node's policy: every version came from a file."""
    return all(info.source.startswith("file") for info in history.versions())


def replay(history: Any, versions: list[BackupVersion], *, by: str) -> list[int]:
    """Apply the backup's versions in order (on the reactor thread: the store swaps there).
    Returns the new version numbers; a version equal to the one before makes none."""
    made = []
    for entry in versions:
        comment = f"{entry.comment} [restored: version {entry.version}, applied by {entry.applied_by}]".strip()
        before = history.store.current
        policy = history.apply(entry.document, by=by, comment=comment, source="restore")
        if before is None or policy.version != before.version:
            made.append(policy.version)
    return made


async def replay_async(history: Any, versions: list[BackupVersion], *, by: str) -> list[int]:
    """`replay` with each version prepared off the reactor thread, one after the other."""
    made = []
    for entry in versions:
        comment = f"{entry.comment} [restored: version {entry.version}, applied by {entry.applied_by}]".strip()
        before = history.store.current
        policy = await history.apply_async(entry.document, by=by, comment=comment, source="restore")
        if before is None or policy.version != before.version:
            made.append(policy.version)
    return made


__all__ = ["FORMAT", "BackupError", "BackupVersion", "build_backup", "check_backup", "is_fresh", "parse_backup",
           "replay", "replay_async"]
